"""A training run as every backend sees it: the solver and net resolved for this run, its outputs, its log.

``prepare_run`` rewrites the solver and net for one run (data paths into --data-dir, the snapshot
prefix into MODELS_DIR/<net>/) and ``save_run`` saves the copies actually used beside the snapshots,
with a config.json; the backends (caffekit/backends/) then train from those copies, and
caffekit/stages.py decides which runs make up a training.

Relative paths follow one rule. Paths given on the command line (--solver, --data-dir, --models-dir,
--weights, --resume) are relative to the working folder. Paths inside prototxts are read as the shipped
prototxts write them: those starting with ``data/`` go into --data-dir, every other relative one is
relative to the repository root (``net: "caffe_models/age_net/train_val.prototxt"``), wherever the
command runs. Absolute paths are kept.
"""
import csv
import io
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from caffekit import atomic, formats, graph, models
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2
from caffekit.snapshots import CAFFEMODEL, parse_snapshot_name

REPO = Path(__file__).resolve().parents[1]
NETS = {key: entry.name for key, entry in models.MODELS.items()}
LOG_FIELDS = ["iter", "loss", "smoothed_loss", "lr", "test_loss", "test_accuracy", "seconds"]


@dataclass
class RunConfig:
    """Everything that decides a training run; saved as config.json beside the snapshots."""
    net: str                      # age_net | gender_net | joint_net: the output folder name
    solver: str                   # the solver file given (before rewriting)
    data_dir: str
    models_dir: str
    backend: str = "torch"
    weights: Optional[str] = None  # initial weights (caffe train -weights)
    resume: Optional[str] = None   # a .solverstate (or the .caffemodel beside one)
    max_iter: Optional[int] = None  # overrides the solver's max_iter
    seed: Optional[int] = None      # overrides the solver's random_seed
    precision: str = "auto"         # auto | fp32 | bf16 | fp16 (CUDA)
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
    """A path from a prototxt for this run, by the rule of the module docstring."""
    if path.startswith("data/"):
        return (Path(data_dir) / path[len("data/"):]).resolve()
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (REPO / candidate).resolve()


def net_file(param: caffe_pb2.SolverParameter) -> str:
    return param.net or param.train_net


def prepare_run(config: RunConfig) -> Tuple[caffe_pb2.SolverParameter, caffe_pb2.NetParameter]:
    """Read, check and rewrite the solver and net for this run (nothing is written yet: see save_run)."""
    from caffekit import solver as solver_lib

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
    # The classifiers as wide as the dataset's classes (Adience: 8 age groups; UTKFace: the shipped 9 bins).
    net = models.fit_net(net, dataset_entry(config))
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
        entry = dataset_entry(config)
        if entry == models.by_name(config.net):  # the shipped labels: the shipped text, byte for byte
            atomic.write_text(out_dir / "deploy.prototxt", deploy.read_text())
        else:
            formats.write_prototxt(out_dir / "deploy.prototxt", models.fit_net(formats.read_net(deploy), entry))
    write_config(config)


def same_run_files(config: RunConfig, param: caffe_pb2.SolverParameter, net: caffe_pb2.NetParameter) -> bool:
    """Whether the solver and net an earlier run saved in config.out_dir are the ones this run would save."""
    try:
        return formats.read_solver(config.solver_resolved) == param and formats.read_net(config.net_resolved) == net
    except (OSError, KitError):
        return False


def dataset_entry(config: RunConfig) -> "models.Model":
    """The net's registry entry with the labels of the dataset it trains on."""
    return models.for_dataset(models.by_name(config.net).key, config.data_dir)


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


def read_config(out_dir) -> dict:
    """The config.json an earlier run left in ``out_dir``; {} when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def newest_snapshot(out_dir, suffix: str = CAFFEMODEL) -> Optional[Path]:
    """The snapshot written last in ``out_dir`` (the highest iteration among equally new files).

    Last written, not highest iteration: a fine-tuning run of 800 iterations must win over the
    6,000-iteration snapshot an earlier from-scratch run left in the same folder."""
    best = None
    for path in Path(out_dir).glob(f"*_iter_*{suffix}"):
        parsed = parse_snapshot_name(path)
        if parsed is None:
            continue
        key = (path.stat().st_mtime, parsed[1])
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
