"""Training: resolve a Caffe solver for a run, then follow it with the torch backend.

``prepare_run`` is shared by every backend: it rewrites the solver and net for this run
(paths starting with ``data/`` point into --data-dir, the snapshot prefix into
$MODELS_DIR/<net>/) and saves the copies actually used beside the snapshots, with a
config.json. ``train_torch`` then executes Caffe's ``Solver::Solve`` loop: test every
test_interval (including iteration 0 unless test_initialization is false), forward and
backward over iter_size batches, the SGD update, snapshots every ``snapshot`` iterations
and after training. Ctrl-C snapshots the current iteration and stops; ``resume`` continues
from a .solverstate with the same schedule and the same batches.
"""
import csv
import io
import json
import os
import platform
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from caffekit import atomic, formats, graph, models
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
NETS = {key: entry.name for key, entry in models.MODELS.items()}
LOG_FIELDS = ["iter", "loss", "smoothed_loss", "lr", "test_loss", "test_accuracy", "seconds"]


@dataclass
class RunConfig:
    """Everything that decides a training run; saved as config.json beside the snapshots."""
    net: str                      # age_net | gender_net: the output folder name
    solver: str                   # the solver file given (before rewriting)
    data_dir: str
    models_dir: str
    backend: str = "torch"
    weights: Optional[str] = None  # initial weights (caffe train -weights)
    resume: Optional[str] = None   # a .solverstate (or the .caffemodel beside one)
    max_iter: Optional[int] = None  # overrides the solver's max_iter
    seed: Optional[int] = None      # overrides the solver's random_seed
    precision: str = "auto"         # auto | fp32 | bf16
    device: str = "auto"            # auto | cpu | cuda
    threads: Optional[int] = None   # torch CPU threads (default: all cores)
    # Filled in by prepare_run:
    out_dir: str = ""
    solver_resolved: str = ""
    net_resolved: str = ""
    snapshot_prefix: str = ""
    extra: Dict = field(default_factory=dict)


# ---------------------------------------------------------------- resolving a run
def resolve_path(path: str, data_dir: Path) -> Path:
    """A path from a prototxt for this run: ``data/...`` goes into ``data_dir``; other relative
    paths are taken from the current folder, or from the repository root where they exist there."""
    if path.startswith("data/"):
        return (data_dir / path[len("data/"):]).resolve()
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    if candidate.exists() or not (REPO / candidate).exists():
        return candidate.resolve()
    return (REPO / candidate).resolve()


def net_file(param: caffe_pb2.SolverParameter) -> str:
    return param.net or param.train_net


def prepare_run(config: RunConfig) -> Tuple[caffe_pb2.SolverParameter, caffe_pb2.NetParameter]:
    """Read, check and rewrite the solver and net for this run (nothing is written yet: see save_run)."""
    from caffekit import solver as solver_lib  # torch-free module part

    solver_path = Path(config.solver)
    param = formats.read_solver(solver_path)
    solver_lib.check_solver(param, str(solver_path))
    data_dir = Path(config.data_dir)
    out_dir = (Path(config.models_dir) / config.net).resolve()
    if param.HasField("net_param") or param.HasField("train_net_param"):
        net = caffe_pb2.NetParameter()
        net.CopyFrom(param.net_param if param.HasField("net_param") else param.train_net_param)
        net_source = f"{solver_path} (net_param)"
    else:
        net_path = resolve_path(net_file(param), data_dir)
        net = formats.read_net(net_path)
        net_source = str(net_path)
    # Validate the layer types of both phases now: a clear error before any output is written.
    for phase in (graph.TRAIN, graph.TEST):
        graph.net_layers(net, phase, net_source)
    for layer in list(net.layer) + list(net.layers):
        if layer.HasField("data_param") and layer.data_param.source:
            layer.data_param.source = str(resolve_path(layer.data_param.source, data_dir))
        if layer.HasField("transform_param") and layer.transform_param.mean_file:
            layer.transform_param.mean_file = str(resolve_path(layer.transform_param.mean_file, data_dir))
        if layer.HasField("infogain_loss_param") and layer.infogain_loss_param.source:
            layer.infogain_loss_param.source = str(resolve_path(layer.infogain_loss_param.source, data_dir))
    prefix = Path(param.snapshot_prefix or config.net).name
    net_resolved = out_dir / "train_val.prototxt"
    solver_resolved = out_dir / "solver.prototxt"
    for name in ("net_param", "train_net_param", "train_net"):
        param.ClearField(name)
    param.net = str(net_resolved)
    param.snapshot_prefix = str(out_dir / prefix)
    if config.max_iter is not None:
        param.max_iter = int(config.max_iter)
    if config.seed is not None:
        param.random_seed = int(config.seed)
    config.out_dir = str(out_dir)
    config.solver_resolved = str(solver_resolved)
    config.net_resolved = str(net_resolved)
    config.snapshot_prefix = param.snapshot_prefix
    config.extra.setdefault("net_source", net_source)
    return param, net


def save_run(config: RunConfig, param: caffe_pb2.SolverParameter, net: caffe_pb2.NetParameter) -> None:
    """Write the solver and net actually used, the matching deploy.prototxt and config.json."""
    out_dir = Path(config.out_dir)
    formats.write_prototxt(config.net_resolved, net)
    formats.write_prototxt(config.solver_resolved, param)
    deploy = REPO / "caffe_models" / config.net / "deploy.prototxt"
    if deploy.is_file() and Path(config.extra.get("net_source", "")).parent == deploy.parent:
        atomic.write_text(out_dir / "deploy.prototxt", deploy.read_text())
    write_config(config)


def write_config(config: RunConfig) -> None:
    data = asdict(config)
    data["host"] = {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count()}
    atomic.write_text(Path(config.out_dir) / "config.json", json.dumps(data, indent=2) + "\n")


def find_resume_files(path) -> Tuple[Path, Path, caffe_pb2.SolverState]:
    """(caffemodel, solverstate, state) for --resume given either file of a snapshot pair."""
    from caffekit import solver as solver_lib

    path = Path(path)
    if path.suffix == ".caffemodel":
        state_path = path.with_suffix(".solverstate")
        if not state_path.is_file():
            raise KitError(f"{path}: no {state_path.name} beside it to resume from (give the .solverstate)")
    else:
        state_path = path
    state = solver_lib.read_solverstate(state_path)
    model_path = path if path.suffix == ".caffemodel" else Path(state.learned_net)
    if not model_path.is_file():
        model_path = state_path.with_suffix(".caffemodel")  # the pair was moved together
    if not model_path.is_file():
        raise KitError(f"{state_path}: its weights {state.learned_net} are missing")
    return model_path, state_path, state


def newest_snapshot(out_dir, suffix: str = ".caffemodel") -> Optional[Path]:
    """The snapshot written last in ``out_dir`` (the highest iteration among equally new files).

    Last written, not highest iteration: a fine-tuning run of 800 iterations must win over the
    6,000-iteration snapshot an earlier from-scratch run left in the same folder."""
    best = None
    for path in Path(out_dir).glob(f"*_iter_*{suffix}"):
        try:
            iteration = int(path.name[:-len(suffix)].rsplit("_iter_", 1)[1])
        except ValueError:
            continue
        key = (path.stat().st_mtime, iteration)
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


# ---------------------------------------------------------------- logs and curves
class TrainLog:
    """train_log.csv: one row per iteration (test columns on test iterations), rewritten atomically."""

    def __init__(self, path: Path, start_iter: int):
        self.path = path
        self.rows: Dict[int, dict] = {}
        if start_iter > 0 and path.is_file():  # resuming: keep the history before the resume point
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        if int(row["iter"]) < start_iter or (int(row["iter"]) == start_iter and not row["loss"]):
                            self.rows[int(row["iter"])] = {k: row.get(k, "") for k in LOG_FIELDS}
                    except (KeyError, ValueError):
                        continue
        self.seconds_before = max((float(r["seconds"]) for r in self.rows.values() if r.get("seconds")),
                                  default=0.0)

    def update(self, iteration: int, **values) -> None:
        row = self.rows.setdefault(iteration, {k: "" for k in LOG_FIELDS})
        row["iter"] = iteration
        for key, value in values.items():
            row[key] = f"{value:.6g}" if isinstance(value, float) else value

    def write(self) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, LOG_FIELDS)
        writer.writeheader()
        for iteration in sorted(self.rows):
            writer.writerow(self.rows[iteration])
        atomic.write_text(self.path, out.getvalue())

    def series(self, key: str):
        points = [(i, float(r[key])) for i, r in sorted(self.rows.items()) if r.get(key) not in ("", None)]
        return [p[0] for p in points], [p[1] for p in points]


def plot_curves(log: TrainLog, path: Path, title: str) -> None:
    """learning_curve.png: train loss (raw and smoothed), test loss, test accuracy, lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    x, y = log.series("loss")
    ax_loss.plot(x, y, color="0.75", linewidth=0.6, label="train loss")
    x, y = log.series("smoothed_loss")
    ax_loss.plot(x, y, color="C0", label="train loss (smoothed)")
    x, y = log.series("test_loss")
    ax_loss.plot(x, y, "o-", color="C1", label="test loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(title)
    x, y = log.series("test_accuracy")
    ax_acc.plot(x, y, "o-", color="C2", label="test accuracy")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylim(0, 1)
    ax_lr = ax_acc.twinx()
    x, y = log.series("lr")
    ax_lr.plot(x, y, color="C3", linewidth=0.8, label="learning rate")
    ax_lr.set_ylabel("learning rate", color="C3")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- the torch backend
def choose_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise KitError("--device cuda: no CUDA device is available to torch")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True where bf16 runs natively (AVX512-BF16 or AMX): elsewhere bf16 autocast is slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpuinfo_has_bf16()
    except (AttributeError, RuntimeError):
        return _cpuinfo_has_bf16()


def _cpuinfo_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str, device) -> str:
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    return precision


def data_layers(net: caffe_pb2.NetParameter, source: str):
    """{phase: [Data layers]} of a net. Several Data layers of a phase read their LMDBs in step (Caffe's
    readers all start at the first key), which is how a second LMDB gives each image a second label."""
    layers = {}
    for phase in (graph.TRAIN, graph.TEST):
        found = [layer for layer in graph.net_layers(net, phase, source) if layer.type == "Data"]
        sizes = {layer.data_param.batch_size for layer in found}
        if len(sizes) > 1:
            raise KitError(f"{source}: the Data layers of phase {caffe_pb2.Phase.Name(phase)} have different "
                           f"batch sizes {sorted(sizes)}: their records would fall out of step")
        if found:
            layers[phase] = found
    if graph.TRAIN not in layers:
        raise KitError(f"{source}: no Data layer for the TRAIN phase")
    return layers


class StopRequest:
    """SIGINT sets a flag that the loop checks between iterations (Caffe's SolverAction::STOP),
    so the weights are never snapshotted halfway through an update. A second Ctrl-C interrupts."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


@dataclass
class TrainResult:
    iterations: int
    last_snapshot: Optional[Path]
    final_loss: Optional[float]
    test: Dict[str, float]
    interrupted: bool


class Trainer:
    """Caffe's Solver over torch modules. Build with a prepared (resolved) solver and net."""

    def __init__(self, config: RunConfig, param: caffe_pb2.SolverParameter, net: caffe_pb2.NetParameter,
                 progress: bool = True):
        import torch

        from caffekit import lmdb_data, solver as solver_lib, torchnet

        self.torch = torch
        self.config = config
        self.param = param
        self.net_param = net
        self.progress = progress
        self.out_dir = Path(config.out_dir)
        source = config.net_resolved or "network"
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.device = choose_device(config.device)
        self.precision = choose_precision(config.precision, self.device)
        seed = param.random_seed if param.random_seed >= 0 else random.SystemRandom().randrange(2 ** 31)
        self.seed = int(seed)
        config.extra.update(seed_used=self.seed, precision_used=self.precision, device_used=str(self.device),
                            torch=torch.__version__, threads_used=torch.get_num_threads())
        data = data_layers(net, source)
        self.train_data = [lmdb_data.DataLayer(layer, train=True, seed=self.seed) for layer in data[graph.TRAIN]]
        self.test_data = None
        if graph.TEST in data and param.test_iter:
            self.test_data = [lmdb_data.DataLayer(layer, train=False, seed=self.seed) for layer in data[graph.TEST]]
        for layers in (self.train_data, self.test_data or []):
            counts = {len(layer.source) for layer in layers}
            if len(counts) > 1:
                raise KitError(f"{source}: the LMDBs of one phase hold different record counts "
                               f"({', '.join(f'{layer.source.path}: {len(layer.source)}' for layer in layers)})")
        self.train_net = torchnet.CaffeNet(net, graph.TRAIN, self._input_shapes(self.train_data), source, self.seed)
        self.test_net = None
        if self.test_data is not None:
            self.test_net = torchnet.CaffeNet(net, graph.TEST, self._input_shapes(self.test_data), source, self.seed)
            self.test_net.share_params(self.train_net)
        self.train_net.to(self.device)
        if self.test_net is not None:
            self.test_net.share_params(self.train_net)
        info = self.train_net.param_info
        self.solver = solver_lib.SgdSolver(param, self.train_net.params(), [p.lr_mult for p in info],
                                           [p.decay_mult for p in info])
        self.last_snapshot: Optional[Path] = None

    @staticmethod
    def _input_shapes(layers) -> Dict[str, Tuple[int, ...]]:
        shapes = {}
        for layer in layers:
            shapes[layer.tops[0]] = layer.shape
            if len(layer.tops) > 1:
                shapes[layer.tops[1]] = (layer.batch_size,)
        return shapes

    # -- weights in and out
    def load_weights(self, path, model=None) -> List[str]:
        model = model if model is not None else formats.read_caffemodel(path)
        copied = self.train_net.load_weights(graph.read_weights(model), str(path))
        if not copied:
            raise KitError(f"{path}: no layer of this network found in the caffemodel")
        return copied

    def restore(self, path, model=None) -> None:
        model_path, state_path, state = find_resume_files(path)
        weights = graph.read_weights(model if model is not None else formats.read_caffemodel(model_path))
        self.train_net.load_weights(weights, str(model_path), require_all=True)
        self.solver.restore(state, str(state_path))
        self.config.extra["resumed_from"] = str(state_path)

    def snapshot(self) -> Path:
        """<prefix>_iter_N.caffemodel (train-phase layers and blobs, as Caffe's Net::ToProto)
        and .solverstate, each written atomically."""
        from caffekit import solver as solver_lib

        model_path, state_path = solver_lib.snapshot_paths(self.param.snapshot_prefix, self.solver.iter)
        layers = []
        for layer in self.train_net.layers:
            copy = caffe_pb2.LayerParameter()
            copy.CopyFrom(layer)
            if not copy.HasField("phase"):
                copy.phase = graph.TRAIN  # Caffe's Net::Init stamps the phase on every layer
            layers.append(copy)
        model = graph.weights_to_model(self.net_param.name, layers, self.train_net.weights())
        formats.write_caffemodel(model_path, model)
        solver_lib.write_solverstate(state_path, self.solver.state(str(model_path)))
        self.last_snapshot = model_path
        return model_path

    # -- one pass
    def _inputs(self, layers, batches) -> Dict[str, object]:
        """The next batch of every Data layer, as the net's input blobs on the device."""
        torch = self.torch
        inputs = {}
        for layer, stream in zip(layers, batches):
            data, labels = next(stream)
            x, y = torch.from_numpy(data), torch.from_numpy(labels)
            if self.device.type == "cuda":
                x, y = x.pin_memory().to(self.device, non_blocking=True), y.to(self.device)
            inputs[layer.tops[0]] = x
            if len(layer.tops) > 1:
                inputs[layer.tops[1]] = y
        return inputs

    def _autocast(self):
        torch = self.torch
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def test(self, batches) -> Dict[str, float]:
        """Caffe's TestClassification: every net output averaged over test_iter batches."""
        torch = self.torch
        totals: Dict[str, float] = {}
        iters = int(self.param.test_iter[0])
        with torch.no_grad(), self._autocast():
            for _ in range(iters):
                blobs = self.test_net(self._inputs(self.test_data, batches))
                for name in self.test_net.outputs:
                    value = blobs[name]
                    if value.dim() == 0:
                        totals[name] = totals.get(name, 0.0) + float(value)
        return {name: total / iters for name, total in totals.items()}

    def run(self) -> TrainResult:
        torch = self.torch
        param = self.param
        solver = self.solver
        start_iter = solver.iter
        max_iter = int(param.max_iter)
        log = TrainLog(self.out_dir / "train_log.csv", start_iter)
        title = f"{self.net_param.name or self.config.net}: {param.lr_policy} lr {param.base_lr:g}, " \
                f"{self.precision} on {self.device.type}"
        iter_size = int(param.iter_size)
        train_batches = [layer.batches(start_iter * iter_size) for layer in self.train_data]
        test_batches = None
        if self.test_data is not None:
            interval = int(param.test_interval)
            tests_before = sum(1 for i in range(0, start_iter, interval) if i > 0 or param.test_initialization)
            test_batches = [layer.batches(tests_before * int(param.test_iter[0])) for layer in self.test_data]
        write_config(self.config)
        losses: List[float] = []
        smoothed = 0.0
        last_test: Dict[str, float] = {}
        started = time.time()
        loss_value = None
        interrupted = False
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=max_iter, initial=start_iter, unit="it", desc=self.config.net, dynamic_ncols=True)

        def say(text):
            (bar.write if bar is not None else print)(text)

        def run_test(iteration):
            nonlocal last_test
            self.train_net.eval()
            last_test = self.test(test_batches)
            self.train_net.train()
            test_loss = sum(v * self.test_net.loss_weights.get(k, 0.0) for k, v in last_test.items())
            accuracy = next((v for k, v in last_test.items() if k not in self.test_net.loss_weights), "")
            log.update(iteration, test_loss=float(test_loss), test_accuracy=accuracy,
                       seconds=log.seconds_before + time.time() - started)
            say(f"Iteration {iteration}, test: " + ", ".join(f"{k} = {v:.4f}" for k, v in last_test.items()))

        try:
            with StopRequest() as stop:
                while solver.iter < max_iter:
                    iteration = solver.iter
                    if (test_batches is not None and iteration % param.test_interval == 0
                            and (iteration > 0 or param.test_initialization)):
                        run_test(iteration)
                        if stop.requested:
                            break
                    # Per-iteration seeds make dropout a function of (seed, iteration), so resuming
                    # reproduces an uninterrupted run.
                    torch.manual_seed(self.seed * 1_000_003 + iteration)
                    loss_sum = 0.0
                    for _ in range(iter_size):
                        inputs = self._inputs(self.train_data, train_batches)
                        with self._autocast():
                            blobs = self.train_net(inputs)
                            loss = self.train_net.loss(blobs)
                        loss.backward()
                        loss_sum += float(loss.detach())
                    loss_value = loss_sum / iter_size
                    if not np.isfinite(loss_value):
                        raise KitError(f"training diverged at iteration {iteration} (loss {loss_value}); "
                                       "lower base_lr in the solver")
                    # Caffe's UpdateSmoothedLoss over the last average_loss iterations.
                    if len(losses) < param.average_loss:
                        losses.append(loss_value)
                        smoothed = (smoothed * (len(losses) - 1) + loss_value) / len(losses)
                    else:
                        index = (iteration - start_iter) % param.average_loss
                        smoothed += (loss_value - losses[index]) / param.average_loss
                        losses[index] = loss_value
                    rate = solver.apply_update()
                    log.update(iteration, loss=loss_value, smoothed_loss=smoothed, lr=rate,
                               seconds=log.seconds_before + time.time() - started)
                    display = param.display and iteration % param.display == 0
                    if display:
                        say(f"Iteration {iteration}, loss = {smoothed:.6g}, lr = {rate:.6g}")
                    solver.iter += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{rate:.3g}")
                    if param.snapshot and solver.iter % param.snapshot == 0:
                        self.snapshot()
                    if display or (param.snapshot and solver.iter % param.snapshot == 0):
                        log.write()
                        if param.snapshot and solver.iter % param.snapshot == 0:
                            plot_curves(log, self.out_dir / "learning_curve.png", title)
                    if stop.requested:
                        break
                interrupted = stop.requested
                if interrupted:
                    say(f"interrupted: snapshotting iteration {solver.iter}")
                    if self.last_snapshot is None or not self.last_snapshot.name.endswith(
                            f"_iter_{solver.iter}.caffemodel"):
                        self.snapshot()
                else:
                    if param.snapshot_after_train and (not param.snapshot or solver.iter % param.snapshot != 0):
                        self.snapshot()
                    if (test_batches is not None and param.test_interval
                            and solver.iter % param.test_interval == 0 and solver.iter > start_iter):
                        run_test(solver.iter)
        finally:
            if bar is not None:
                bar.close()
            for stream in train_batches + (test_batches or []):
                stream.close()
            if log.rows:
                log.write()
                plot_curves(log, self.out_dir / "learning_curve.png", title)
        return TrainResult(solver.iter, self.last_snapshot, loss_value, last_test, interrupted)


def train_torch(config: RunConfig, progress: bool = True) -> TrainResult:
    """Prepare the run and train it with the torch backend. Raises KeyboardInterrupt after the
    snapshot when stopped by Ctrl-C (the CLI turns that into a non-zero exit)."""
    if config.weights and config.resume:
        raise KitError("give --weights or --resume, not both (as caffe train)")
    # Everything that can fail on bad input fails here, before any output is written.
    resume_files = find_resume_files(config.resume) if config.resume else None
    start_model = None
    if config.weights:
        start_model = formats.read_caffemodel(config.weights)
    elif resume_files:
        start_model = formats.read_caffemodel(resume_files[0])
    param, net = prepare_run(config)
    trainer = Trainer(config, param, net, progress=progress)
    if config.weights:
        config.extra["weights_copied"] = trainer.load_weights(config.weights, start_model)
    if resume_files:
        trainer.restore(resume_files[1], start_model)
    save_run(config, param, net)
    result = trainer.run()
    if result.interrupted:
        raise KeyboardInterrupt
    return result
