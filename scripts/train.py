#!/usr/bin/env python3
"""Train AgeNet, GenderNet or the joint net from the Caffe prototxts, with real Caffe or the embedded torch backend.

    python scripts/train.py --net age                  # what `make train-age` does: pre-train, then fine-tune
    python scripts/train.py --net age --no-pretrain    # DATA_DIR alone, solver.prototxt (make PRETRAIN=0)
    python scripts/train.py --net age --resume models/age_net/age_net_iter_400.solverstate
    python scripts/train.py --net gender --backend caffe --solver caffe_models/gender_net/solver_levi_hassner.prototxt
    torchrun --nproc-per-node=2 scripts/train.py --net joint   # data-parallel: 2 workers, each its own batch

Two stages by default: stage 1 trains from scratch on the pre-training set that `make dataset` builds in
DATA_DIR/pretrain (all races, the test faces of DATA_DIR held out; --pretrain-data DIR points elsewhere)
with --pretrain-solver (default: solver_pretrain.prototxt) into MODELS_DIR/pretrain/<net>_net; stage 2
fine-tunes its last snapshot on DATA_DIR with --solver (default: solver_finetune.prototxt). One stage on
DATA_DIR with solver.prototxt with --no-pretrain or --weights, or where DATA_DIR/pretrain holds no
pre-training set. A finished stage 1 (same set, same solver and net, seed included)
is not run again; --resume continues whichever stage its snapshot belongs to (caffekit/stages.py).

Last, the final snapshot gets a prior-corrected copy, <prefix>_prior_iter_N.caffemodel (see
caffekit/prior.py: the train split's class prior, which oversampling took away, added back to the
classifiers' bias), unless --no-prior. It is written last, so evaluation and compilation take it by default.

Outputs in MODELS_DIR/<net>_net/: the solver and train_val actually used (paths rewritten for
DATA_DIR), <prefix>_iter_N.caffemodel/.solverstate snapshots, train_log.csv, learning_curve.png,
config.json. Ctrl-C writes a snapshot of the current iteration (exit status 130); --resume continues.
Paths given here are relative to the working folder; relative paths inside prototxts are relative to
the repository root, except data/..., which goes into DATA_DIR (caffekit/training.py).

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) the torch backend trains data-parallel with Caffe's
multi-GPU semantics: N workers of batch_size each make one step on N x batch_size; rank 0 alone writes
and prints (caffekit/distributed.py).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffekit import backends, distributed, models, stages  # noqa: E402
from caffekit.errors import cli  # noqa: E402


def build_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", required=True, choices=sorted(models.MODELS), help="which network to train")
    parser.add_argument("--backend", default="auto", choices=backends.NAMES,
                        help="auto: a native `caffe` on PATH, else torch (default: auto)")
    parser.add_argument("--data-dir", default="data", help="what `make dataset` wrote (default: data)")
    parser.add_argument("--models-dir", default="models", help="outputs go to MODELS_DIR/<net>_net (default: models)")
    parser.add_argument("--solver", help="solver prototxt of the last stage (default: caffe_models/<net>_net/"
                                         "solver_finetune.prototxt after pre-training, else solver.prototxt)")
    parser.add_argument("--pretrain-solver", help="solver prototxt of stage 1, the pre-training (default: "
                                                  "caffe_models/<net>_net/solver_pretrain.prototxt)")
    pretraining = parser.add_mutually_exclusive_group()
    pretraining.add_argument("--pretrain-data", metavar="DIR",
                             help="pre-train on DIR (default: DATA_DIR/pretrain where `make dataset` built it)")
    pretraining.add_argument("--no-pretrain", action="store_true", help="one stage, on DATA_DIR alone")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", help="a .solverstate (or the .caffemodel beside one) to continue from")
    start.add_argument("--weights", help="initial weights from a .caffemodel (fine-tuning; as caffe train -weights); "
                                         "no pre-training stage")
    parser.add_argument("--max-iter", type=int, help="override the solver's max_iter, of both stages (smoke runs)")
    parser.add_argument("--seed", type=int, help="override the solver's random_seed")
    parser.add_argument("--no-prior", action="store_true",
                        help="do not write the prior-corrected copy of the final snapshot (keep balanced classes)")
    torch_opts = parser.add_argument_group("torch backend")
    torch_opts.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                            help="auto: bf16 autocast where the CPU has AVX512-BF16/AMX or the GPU is Ampere or "
                                 "newer, fp16 autocast with loss scaling on older GPUs, else fp32")
    torch_opts.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    torch_opts.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    torch_opts.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    return parser


@cli
def main(argv=None) -> int:
    options = stages.Options(**vars(build_argparser().parse_args(argv)))
    with distributed.quiet_unless_main():  # under torchrun, rank 0 speaks for every worker
        stages.train(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
