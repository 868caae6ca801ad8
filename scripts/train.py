#!/usr/bin/env python3
"""Train AgeNet or GenderNet from the Caffe prototxts, with real Caffe or the embedded torch backend.

    python scripts/train.py --net age --data-dir data --models-dir models
    python scripts/train.py --net age --resume models/age_net/age_net_iter_2000.solverstate
    python scripts/train.py --net gender --backend caffe --solver caffe_models/gender_net/solver_levi_hassner.prototxt
    python scripts/train.py --net age --pretrain-data data/pretrain     # the two-stage default of `make train-age`

With --pretrain-data, training has two stages: stage 1 trains from scratch on the pre-training set
(`make dataset` builds it from all races, with the test faces of DATA_DIR held out) with
solver_pretrain.prototxt into MODELS_DIR/pretrain/<net>_net; stage 2 fine-tunes its last snapshot on
DATA_DIR with --solver (default: solver_finetune.prototxt). A finished stage 1 is not run again;
--resume continues whichever stage its snapshot belongs to.

Last, the final snapshot gets a prior-corrected copy, <prefix>_prior_iter_N.caffemodel (see
caffekit/prior.py: the train split's class prior, which oversampling took away, added back to fc8's
bias), unless --no-prior. It is written last, so evaluation and compilation take it by default.

Outputs in MODELS_DIR/<net>_net/: the solver and train_val actually used (paths rewritten for
DATA_DIR), <prefix>_iter_N.caffemodel/.solverstate snapshots, train_log.csv, learning_curve.png,
config.json. Ctrl-C writes a snapshot of the current iteration (exit status 130); --resume continues.
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffekit import models, prior, training  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402

REPO = training.REPO
DOCKER_IMAGE = "caffekit-caffe:cpu"


def build_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", required=True, choices=sorted(training.NETS), help="which network to train")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "caffe", "docker"],
                        help="auto: a native `caffe` on PATH, else torch (default: auto)")
    parser.add_argument("--data-dir", default="data", help="what `make dataset` wrote (default: data)")
    parser.add_argument("--models-dir", default="models", help="outputs go to MODELS_DIR/<net>_net (default: models)")
    parser.add_argument("--solver", help="solver prototxt (default: caffe_models/<net>_net/solver.prototxt, or "
                                         "solver_finetune.prototxt with --pretrain-data)")
    parser.add_argument("--pretrain-data", metavar="DIR",
                        help="pre-train on DIR (solver_pretrain.prototxt), then fine-tune on --data-dir")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", help="a .solverstate (or the .caffemodel beside one) to continue from")
    start.add_argument("--weights", help="initial weights from a .caffemodel (fine-tuning; as caffe train -weights)")
    parser.add_argument("--max-iter", type=int, help="override the solver's max_iter, of both stages (smoke runs)")
    parser.add_argument("--seed", type=int, help="override the solver's random_seed")
    parser.add_argument("--no-prior", action="store_true",
                        help="do not write the prior-corrected copy of the final snapshot (keep balanced classes)")
    torch_opts = parser.add_argument_group("torch backend")
    torch_opts.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                            help="auto: bf16 autocast where the CPU has AVX512-BF16/AMX or on CUDA, else fp32")
    torch_opts.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    torch_opts.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    torch_opts.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    return parser


def choose_backend(backend: str) -> str:
    if backend == "auto":
        return "caffe" if shutil.which("caffe") else "torch"
    return backend


def caffe_command(config: training.RunConfig, caffe: str = "caffe", start_state=None):
    """`caffe train` on the resolved solver, resuming from ``start_state`` when given."""
    command = [caffe, "train", "-solver", config.solver_resolved]
    if config.resume:
        _, state_path, _ = training.find_resume_files(config.resume)
        command += ["-snapshot", str(Path(state_path).resolve())]
    elif start_state:
        command += ["-snapshot", str(Path(start_state).resolve())]
    return command


def weights_solverstate(config: training.RunConfig, net) -> Path:
    """An iteration-0 SolverState (zero momentum) naming --weights as its learned_net.

    Resuming from it is what `caffe train -weights` does: Caffe's Restore copies the layers by
    name with the same CopyTrainedLayersFrom. Used instead of -weights because some Caffe builds
    (the SSD fork among them) silently ignore -weights in `caffe train`.
    """
    from caffekit import formats, graph
    from caffekit.lmdb_data import LmdbSource
    from caffekit.proto import caffe_pb2

    inputs = {}
    for data in training.data_layers(net, config.net_resolved)[graph.TRAIN]:
        source = LmdbSource(data.data_param.source)
        channels, height, width = source.shape
        source.close()
        crop = data.transform_param.crop_size
        batch = data.data_param.batch_size
        inputs[data.top[0]] = (batch, channels, crop or height, crop or width)
        if len(data.top) > 1:
            inputs[data.top[1]] = (batch,)
    layers = graph.net_layers(net, graph.TRAIN, config.net_resolved)
    shapes = graph.blob_shapes(layers, inputs)
    state = caffe_pb2.SolverState(iter=0, learned_net=str(Path(config.weights).resolve()), current_step=0)
    import numpy as np

    for layer in layers:
        if layer.bottom:
            for shape in graph.learnable_shapes(layer, shapes):
                state.history.append(formats.array_to_blob(np.zeros(shape, np.float32)))
    path = Path(config.out_dir) / "init_from_weights.solverstate"
    from caffekit import atomic

    atomic.write_bytes(path, state.SerializeToString())
    return path


def run_caffe(config: training.RunConfig, command, cwd: Path) -> int:
    """Run Caffe, copying its log to the console and to caffe_train.log, then turn the log
    into train_log.csv and learning_curve.png like the torch backend's."""
    log_path = Path(config.out_dir) / "caffe_train.log"
    print("running: " + " ".join(shlex.quote(c) for c in command), file=sys.stderr)
    with log_path.open("w") as log:
        try:
            process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except FileNotFoundError:
            raise KitError(f"{command[0]}: not found") from None
        try:
            for line in process.stdout:
                sys.stderr.write(line)
                log.write(line)
            code = process.wait()
        except KeyboardInterrupt:
            # Caffe's own SIGINT handling snapshots and stops; wait for it.
            code = process.wait()
            caffe_log_to_csv(log_path, Path(config.out_dir))
            raise
    caffe_log_to_csv(log_path, Path(config.out_dir))
    return code


_ITER_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = ([-\d.e+naif]+)")
_ITER_LR = re.compile(r"Iteration (\d+), lr = ([-\d.e+]+)")
_ITER_TEST = re.compile(r"Iteration (\d+), Testing net")
_TEST_OUT = re.compile(r"Test net output #\d+: (\S+) = ([-\d.e+naif]+)")


def caffe_log_to_csv(log_path: Path, out_dir: Path) -> None:
    """train_log.csv from a Caffe log (glog lines), so both backends leave the same outputs."""
    log = training.TrainLog(out_dir / "train_log.csv", 0)
    test_iter = None
    for line in log_path.read_text(errors="replace").splitlines():
        if m := _ITER_TEST.search(line):
            test_iter = int(m.group(1))
        elif (m := _TEST_OUT.search(line)) and test_iter is not None:
            name, value = m.group(1), float(m.group(2))
            log.update(test_iter, **({"test_loss": value} if "loss" in name else {"test_accuracy": value}))
        elif m := _ITER_LOSS.search(line):
            log.update(int(m.group(1)), smoothed_loss=float(m.group(2)))
        elif m := _ITER_LR.search(line):
            log.update(int(m.group(1)), lr=float(m.group(2)))
    if log.rows:
        log.write()
        training.plot_curves(log, out_dir / "learning_curve.png", "caffe train")


def docker_command(config: training.RunConfig, image: str = DOCKER_IMAGE, start_state=None):
    """`caffe train` inside the docker/caffe image: the repo, data and models folders are mounted at
    the same absolute paths, so the resolved prototxts work unchanged inside the container."""
    mounts = []
    for path in (REPO, Path(config.data_dir).resolve(), Path(config.models_dir).resolve()):
        if not any(str(path).startswith(str(m) + os.sep) or path == m for m in mounts):
            mounts.append(path)
    command = ["docker", "run", "--rm", "--init", "-u", f"{os.getuid()}:{os.getgid()}", "-w", str(REPO)]
    for path in mounts:
        command += ["-v", f"{path}:{path}"]
    return command + [image] + caffe_command(config, "caffe", start_state)


def ensure_docker_image(image: str = DOCKER_IMAGE) -> None:
    """Check the engine, then build docker/caffe as ``image`` unless it exists."""
    if not shutil.which("docker"):
        raise KitError("docker: not found on PATH (install Docker, or use --backend torch)")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        raise KitError(f"docker: the Docker engine is not reachable ({reason})")
    if subprocess.run(["docker", "image", "inspect", image], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        print(f"building {image} from docker/caffe (once; a few minutes)", file=sys.stderr)
        if subprocess.run(["docker", "build", "-t", image, str(REPO / "docker" / "caffe")]).returncode != 0:
            raise KitError(f"{REPO / 'docker' / 'caffe' / 'Dockerfile'}: docker build failed (see the output above)")


def train_stage(args, net: str, solver: Path, data_dir: str, models_dir: str, weights=None, resume=None,
                extra=None) -> Path:
    """One training run with the chosen backend; returns the final snapshot's caffemodel."""
    backend = choose_backend(args.backend)
    config = training.RunConfig(
        net=net, solver=str(solver), data_dir=data_dir, models_dir=models_dir, backend=backend,
        weights=weights, resume=resume, max_iter=args.max_iter, seed=args.seed,
        precision=args.precision, device=args.device, threads=args.threads, extra=dict(extra or {}))
    if backend == "torch":
        result = training.train_torch(config, progress=not args.no_progress)
        print(f"trained {net} to iteration {result.iterations}; last snapshot: {result.last_snapshot}")
        return Path(result.last_snapshot)
    if backend == "docker":
        ensure_docker_image()
    if config.resume:
        training.find_resume_files(config.resume)  # one-line error before anything is written
    if config.weights:
        training.formats.read_caffemodel(config.weights)
    param, net_param = training.prepare_run(config)
    training.save_run(config, param, net_param)
    start_state = weights_solverstate(config, net_param) if config.weights else None
    if backend == "caffe":
        caffe = shutil.which("caffe")
        if caffe is None:
            raise KitError("caffe: not found on PATH (build Caffe, use --backend docker, or --backend torch)")
        command = caffe_command(config, caffe, start_state)
    else:
        command = docker_command(config, start_state=start_state)
    code = run_caffe(config, command, cwd=REPO)
    if code != 0:
        raise KitError(f"caffe train failed with exit status {code} (log: {Path(config.out_dir) / 'caffe_train.log'})")
    print(f"trained {net}; snapshots in {config.out_dir}")
    return final_snapshot(config, param)


def shipped_solver(net: str, name: str) -> Path:
    return REPO / "caffe_models" / net / name


def final_snapshot(config: training.RunConfig, param) -> Path:
    return Path(f"{config.snapshot_prefix}_iter_{param.max_iter}.caffemodel")


def pretrained_weights(args, net: str, stage1_models: Path) -> Path:
    """Stage 1: its final snapshot, trained now unless an earlier run finished it."""
    solver = shipped_solver(net, "solver_pretrain.prototxt")
    data = Path(args.pretrain_data)
    if not (data / "lmdb").is_dir():
        raise KitError(f"{data}: no pre-training set there (run `make dataset`, which builds it, "
                       f"or train on DATA_DIR alone with PRETRAIN=0)")
    manifest = data / "manifest.json"
    # Which pre-training set the weights saw: a set rebuilt with another split (another SEED) held out
    # other test faces, so weights trained on the old one must not be reused.
    data_id = {"pretrain_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
               if manifest.is_file() else None}
    resume = args.resume if args.resume and is_inside(args.resume, stage1_models) else None
    config = training.RunConfig(net=net, solver=str(solver), data_dir=str(data), models_dir=str(stage1_models),
                                max_iter=args.max_iter, seed=args.seed)
    param, _ = training.prepare_run(config)
    final = final_snapshot(config, param)
    if final.is_file() and not resume and _run_extra(config.out_dir).get("pretrain_manifest_sha256") == \
            data_id["pretrain_manifest_sha256"]:
        print(f"stage 1 done earlier on this pre-training set: fine-tuning {final}", file=sys.stderr)
        return final
    print(f"stage 1: pre-training on {data} with {solver.name}", file=sys.stderr)
    return train_stage(args, net, solver, str(data), str(stage1_models), resume=resume, extra=data_id)


def _run_extra(out_dir) -> dict:
    path = Path(out_dir) / "config.json"
    try:
        return json.loads(path.read_text()).get("extra", {})
    except (OSError, ValueError):
        return {}


def is_inside(path, folder: Path) -> bool:
    return Path(folder).resolve() in Path(path).resolve().parents


@cli
def main(argv=None) -> int:
    args = build_argparser().parse_args(argv)
    net = training.NETS[args.net]
    final = train_final_stage(args, net)
    if not args.no_prior:
        write_prior_corrected(args, final)
    elif models.model(args.net).fixed_layers:
        out = prior.corrected_name(final, "deploy")
        prior.finished_copy(final, out, args.net)
        print(f"with its fixed layers: {out}")
    return 0


def train_final_stage(args, net: str) -> Path:
    if not args.pretrain_data:
        solver = Path(args.solver) if args.solver else shipped_solver(net, "solver.prototxt")
        return train_stage(args, net, solver, args.data_dir, args.models_dir, weights=args.weights,
                           resume=args.resume)
    if args.weights:
        raise KitError("--weights and --pretrain-data both give the starting weights: choose one")
    solver = Path(args.solver) if args.solver else shipped_solver(net, "solver_finetune.prototxt")
    stage1_models = Path(args.models_dir) / "pretrain"
    if args.resume and not is_inside(args.resume, stage1_models):
        # A stage-2 snapshot carries its own weights: stage 1 is not needed.
        return train_stage(args, net, solver, args.data_dir, args.models_dir, resume=args.resume)
    weights = pretrained_weights(args, net, stage1_models)
    print(f"stage 2: fine-tuning on {args.data_dir} with {solver.name}", file=sys.stderr)
    return train_stage(args, net, solver, args.data_dir, args.models_dir, weights=str(weights))


def write_prior_corrected(args, final: Path) -> None:
    manifest = Path(args.data_dir) / "manifest.json"
    if not manifest.is_file():
        print(f"no {manifest} (not built by `make dataset`): no prior-corrected copy written", file=sys.stderr)
        return
    out = prior.corrected_name(final)
    shifts = prior.correct(final, manifest, args.net, out)
    for layer, shift in shifts.items():
        values = " ".join(f"{v:.2f}" for v in shift[:12]) + (" ..." if len(shift) > 12 else "")
        print(f"prior-corrected copy: {out} ({layer} bias + [{values}])")


if __name__ == "__main__":
    sys.exit(main())
