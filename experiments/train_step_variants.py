"""How much each of the torch trainer's speed choices buys, measured interleaved in one process.

The trainer runs each BatchNorm together with the Scale after it as one op (torchnet.execution_steps) and keeps
4-D tensors channels_last on the CPU (backends/torch.memory_format). This times one training step (forward,
backward, Caffe's SGD update) of four variants of the same net, one step of each per round, so that the
speed drift of a shared machine falls on all of them alike, and prints each variant's median images/s and
its median speed-up over the old layer-by-layer NCHW step.

    python experiments/train_step_variants.py --net joint --precision fp32 --rounds 30
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python experiments/train_step_variants.py   # as an AVX2-only CPU
"""
import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import bench_train  # noqa: E402
from caffekit import training  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="joint", choices=sorted(training.NETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    variants = {}
    for fused in (False, True):
        for nchw in (True, False):
            name = f"{'fused' if fused else 'layer by layer'}, {'NCHW' if nchw else 'channels_last'}"
            variants[name] = bench_train.training_step(training.NETS[args.net], args.batch, args.precision, nchw,
                                                       fused)
    times = bench_train.interleaved(variants, args.rounds)
    base = next(iter(times.values()))
    print(f"{args.net}, batch {args.batch}, {args.precision}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} interleaved rounds:")
    for name, values in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, values))
        print(f"  {name:30s} {args.batch / statistics.median(values):7.1f} images/s   x{ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
