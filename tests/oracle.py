"""Drive the real Caffe oracle (../shared/tools/caffe-oracle) from the tests.

Caffe lives in its own virtualenv (numpy 1.26, protobuf 4) beside ours, so everything
runs in a subprocess: the ``caffe`` and ``compute_image_mean`` tools, and pycaffe
scripts run with the oracle's python and PYTHONPATH. Arrays cross the boundary as
.npz files. Caffe's GLOG output goes to a log file; a failing call raises
``OracleError`` with the log's tail, and tests print the log so pytest shows it
only when a test fails.

Also here: small builders for test inputs that both sides read (LMDBs of real faces,
prototxt copies with rewritten paths), and parsers of Caffe's log lines.
"""
import contextlib
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import lmdb
import numpy as np

from caffe_fixtures import write_lmdb  # noqa: F401  (oracle.write_lmdb: the tests' one LMDB writer)
from caffekit import formats, graph
from caffekit.proto import caffe_pb2
from caffekit.tasks import age_to_bin

REPO = Path(__file__).resolve().parents[1]


class OracleError(AssertionError):
    """A Caffe tool or pycaffe script failed; the message carries its log's tail."""


# ---------------------------------------------------------------- running Caffe
def _env(oracle: dict, quiet: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(oracle["pythonpath"])
    # INFO lines carry the losses we parse; pycaffe helpers do not need them.
    env["GLOG_minloglevel"] = "2" if quiet else "0"
    env["GLOG_logtostderr"] = "1"
    env.pop("PYTHONHOME", None)
    return env


def _run(oracle: dict, argv: Sequence[str], cwd: Path, log_name: str, quiet: bool, timeout: float) -> str:
    log_path = Path(cwd) / log_name
    with open(log_path, "w") as log:
        proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(oracle, quiet), stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise OracleError(f"{' '.join(map(str, argv))} exited {proc.returncode} in {cwd}; log tail:\n{tail}")
    return text


def caffe_train_from(oracle: dict, solver: Path, cwd: Path, init_model: Path, timeout: float = 300) -> str:
    """``caffe train`` starting from the weights of ``init_model`` at iteration 0.

    This oracle build's ``caffe train`` ignores ``-weights`` (its tools/caffe.cpp lost the
    CopyLayers call), so we resume from a SolverState of iteration 0 with zero momentum
    history whose ``learned_net`` is ``init_model``: Caffe's Restore loads those weights, and
    the run is then exactly a fresh run from them (upstream Caffe behaves the same).
    """
    state_path = Path(cwd) / (Path(init_model).stem + ".solverstate")
    write_initial_state(state_path, init_model)
    return run_tool(oracle, "caffe", ["train", "-solver", solver, "-snapshot", state_path], cwd, timeout)


def write_initial_state(path: Path, model_path: Path) -> None:
    """A SolverState of iteration 0: zero history blobs shaped like the model's learnable blobs,
    in Caffe's learnable_params order (layer order; weights, then bias)."""
    state = caffe_pb2.SolverState(iter=0, current_step=0, learned_net=str(Path(model_path).resolve()))
    for layer in graph.all_layers(formats.read_caffemodel(model_path)):
        for blob in layer.blobs:
            state.history.append(formats.array_to_blob(np.zeros(formats.blob_to_array(blob).shape, np.float32)))
    Path(path).write_bytes(state.SerializeToString())


def run_tool(oracle: dict, tool: str, args: Sequence, cwd: Path, timeout: float = 300) -> str:
    """Run one of the oracle's binaries (``caffe``, ``compute_image_mean``, ...); its log."""
    return _run(oracle, [oracle["bin"] / tool, *args], cwd, f"{tool}.log", quiet=False, timeout=timeout)


def caffe_train(oracle: dict, solver: Path, cwd: Path, timeout: float = 300) -> str:
    """``caffe train -solver S`` in ``cwd`` (weights from the prototxt's fillers); the full GLOG log."""
    return run_tool(oracle, "caffe", ["train", "-solver", solver], cwd, timeout)


def run_pycaffe(oracle: dict, script: str, cwd: Path, args: dict, timeout: float = 300) -> str:
    """Run a pycaffe ``script`` (source text) with the oracle's python; it reads ``ARGS`` (a dict)."""
    cwd = Path(cwd)
    path = cwd / "pycaffe_script.py"
    path.write_text(f"ARGS = {json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in args.items()})}\n"
                    + textwrap.dedent(script))
    return _run(oracle, [oracle["python"], path], cwd, "pycaffe.log", quiet=True, timeout=timeout)


_FORWARD_SCRIPT = """
import numpy as np
import caffe

caffe.set_mode_cpu()
phase = caffe.TEST if ARGS["phase"] == "TEST" else caffe.TRAIN
if ARGS["weights"]:
    net = caffe.Net(ARGS["prototxt"], ARGS["weights"], phase)
else:
    net = caffe.Net(ARGS["prototxt"], phase)
inputs = dict(np.load(ARGS["inputs"])) if ARGS["inputs"] else {}
for name, value in inputs.items():
    net.blobs[name].reshape(*value.shape)
    net.blobs[name].data[...] = value
results = {}
for i in range(ARGS["passes"]):
    net.forward()
    for name in ARGS["blobs"]:
        results[f"{name}:{i}"] = net.blobs[name].data.copy()
for layer, blobs in net.params.items():
    for j, blob in enumerate(blobs):
        results[f"param:{layer}:{j}"] = blob.data.copy()
np.savez(ARGS["out"], **results)
"""


def pycaffe_forward(oracle: dict, prototxt: Path, cwd: Path, blobs: Sequence[str], weights: Optional[Path] = None,
                    inputs: Optional[Dict[str, np.ndarray]] = None, phase: str = "TEST", passes: int = 1) -> dict:
    """Run ``passes`` forward passes of a net in pycaffe.

    Returns ``{blob: [array per pass]}`` for ``blobs`` and ``{"params": {layer: [arrays]}}``
    (the weights pycaffe holds, to check what it loaded).
    """
    cwd = Path(cwd)
    inputs_path = ""
    if inputs:
        inputs_path = cwd / "pycaffe_inputs.npz"
        np.savez(inputs_path, **{k: np.asarray(v, np.float32) for k, v in inputs.items()})
    out = cwd / "pycaffe_outputs.npz"
    run_pycaffe(oracle, _FORWARD_SCRIPT, cwd, {
        "prototxt": prototxt, "weights": weights or "", "inputs": inputs_path, "phase": phase,
        "passes": passes, "blobs": list(blobs), "out": out})
    results: dict = {name: [] for name in blobs}
    params: Dict[str, list] = {}
    with np.load(out) as saved:
        for key in sorted(saved.files, key=lambda k: (k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1]))):
            if key.startswith("param:"):
                _, layer, _ = key.split(":")
                params.setdefault(layer, []).append(saved[key])
            else:
                name, _ = key.rsplit(":", 1)
                results[name].append(saved[key])
    results["params"] = params
    return results


@contextlib.contextmanager
def shown_on_failure(title: str, text: str):
    """Print ``text`` (a Caffe log, a trainer's output) only if the block fails, so pytest shows it
    with the failure and keeps passing runs quiet (even under -rA)."""
    try:
        yield
    except BaseException:
        print(f"----- {title} -----\n{text}")
        raise


# ---------------------------------------------------------------- Caffe's log lines
_NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
_ITER_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = " + _NUMBER)
_ITER_LR = re.compile(r"Iteration (\d+), lr = " + _NUMBER)
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = " + _NUMBER)
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = " + _NUMBER)
_TESTING = re.compile(r"Iteration (\d+), Testing net")


def parse_losses(log: str) -> Dict[int, float]:
    """``{iteration: loss}`` from ``Iteration N (...), loss = X`` (smoothed over ``average_loss``)."""
    return {int(m.group(1)): float(m.group(2)) for m in _ITER_LOSS.finditer(log)}


def parse_lrs(log: str) -> Dict[int, float]:
    """``{iteration: learning rate}`` from ``Iteration N, lr = X`` (logged on display iterations)."""
    return {int(m.group(1)): float(m.group(2)) for m in _ITER_LR.finditer(log)}


def _parse_outputs(log: str, start: "re.Pattern", output: "re.Pattern") -> Dict[int, Dict[str, float]]:
    """``{iteration: {output: value}}``: ``output`` lines grouped under the last ``start`` line."""
    outputs: Dict[int, Dict[str, float]] = {}
    current = None
    for line in log.splitlines():
        m = start.search(line)
        if m:
            current = int(m.group(1))
            outputs[current] = {}
            continue
        m = output.search(line)
        if m and current is not None:
            outputs[current][m.group(2)] = float(m.group(3))
    return outputs


def parse_train_outputs(log: str) -> Dict[int, Dict[str, float]]:
    """``{iteration: {output: value}}`` from the ``Train net output #k: name = X`` lines
    that follow each ``Iteration N, loss`` line (the raw, unsmoothed outputs)."""
    return _parse_outputs(log, _ITER_LOSS, _TRAIN_OUTPUT)


def parse_test_outputs(log: str) -> Dict[int, Dict[str, float]]:
    """``{iteration: {output: value}}`` from ``Iteration N, Testing net`` and ``Test net output`` lines."""
    return _parse_outputs(log, _TESTING, _TEST_OUTPUT)


# ---------------------------------------------------------------- test inputs both sides read
def face_files(utkface_dir: Path, count: int, seed: int = 0) -> List[Path]:
    """``count`` well-formed UTKFace files (``age_gender_race_*``), a fixed sample for ``seed``
    (spread over the folder, so ages and genders are mixed)."""
    files = []
    for path in sorted(Path(utkface_dir).iterdir()):
        parts = path.name.split("_")
        if len(parts) >= 4 and parts[0].isdigit() and parts[1] in ("0", "1") and path.stat().st_size > 0:
            files.append(path)
    if len(files) < count:
        raise ValueError(f"{utkface_dir}: only {len(files)} usable faces, need {count}")
    picks = np.random.default_rng(seed).choice(len(files), count, replace=False)
    return [files[i] for i in picks]


def built_dataset(utkface_dir: Path, root: Path, count: int, seed: int, **options) -> Path:
    """``root/data``: a real dataset.build of ``count`` UTKFace faces (linked into ``root/faces``), all races."""
    from dataset import build

    faces = Path(root) / "faces"
    faces.mkdir(parents=True)
    for path in face_files(utkface_dir, count, seed=seed):
        os.symlink(path, faces / path.name)
    out = Path(root) / "data"
    build.build(faces, out, race="all", seed=1, progress=False, **options)
    return out


def load_faces(files: Sequence[Path], size: int, task: str = "age"):
    """(uint8 N x 3 x size x size BGR images, int labels) of UTKFace files."""
    images, labels = [], []
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{path}: unreadable image")
        bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        images.append(bgr.transpose(2, 0, 1))
        age, gender = path.name.split("_")[:2]
        labels.append(age_to_bin(int(age)) if task == "age" else int(gender))
    return np.stack(images), np.asarray(labels, np.int64)


def filler_weights(net: caffe_pb2.NetParameter, input_shape: Sequence[int], seed: int) -> Dict[str, List[np.ndarray]]:
    """Weights drawn as the prototxt's fillers say (gaussian std / constant value), seeded:
    the regime real training starts in."""
    layers = graph.net_layers(net, graph.TRAIN)
    shapes = graph.blob_shapes(layers, {"data": tuple(input_shape), "label": tuple(input_shape[:1])})
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in layers:
        blob_shapes = graph.learnable_shapes(layer, shapes) if layer.bottom else []
        if not blob_shapes:
            continue
        p = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
        arrays = []
        for shape, filler in zip(blob_shapes, (p.weight_filler, p.bias_filler)):
            if filler.type == "gaussian":
                arrays.append((rng.standard_normal(shape) * filler.std + filler.mean).astype(np.float32))
            elif filler.type in ("constant", ""):
                arrays.append(np.full(shape, filler.value, np.float32))
            else:
                raise ValueError(f"layer {layer.name}: filler {filler.type!r} not drawn here")
        weights[layer.name] = arrays
    return weights


def data_layer(net: caffe_pb2.NetParameter, phase: int) -> caffe_pb2.LayerParameter:
    """The Data layer of ``net`` included in ``phase``."""
    return next(layer for layer in net.layer if layer.type == "Data" and any(r.phase == phase for r in layer.include))


def read_lmdb(path: Path):
    """(images, labels) of an LMDB of raw Datums, in key order."""
    images, labels = [], []
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = formats.parse_datum(value)
            images.append(formats.datum_to_array(datum))
            labels.append(datum.label)
    env.close()
    return np.stack(images), np.asarray(labels, np.int64)


def rewrite_train_val(src: Path, dst: Path, train_source: Path, test_source: Path, mean_file: Optional[Path],
                      batch_size: int, crop_size: Optional[int] = None, mirror: Optional[bool] = None,
                      dropout_ratio: Optional[float] = None) -> caffe_pb2.NetParameter:
    """A copy of a train_val prototxt with data paths, batch size and (optionally) transform
    and dropout settings replaced; everything else stays as in ``src``."""
    net = formats.read_net(src)
    for layer in net.layer:
        if layer.type == "Data":
            is_train = any(rule.phase == caffe_pb2.TRAIN for rule in layer.include)
            layer.data_param.source = str(train_source if is_train else test_source)
            layer.data_param.batch_size = batch_size
            transform = layer.transform_param
            if mean_file is None:
                transform.ClearField("mean_file")
            else:
                transform.mean_file = str(mean_file)
            if crop_size is not None:
                transform.crop_size = crop_size
            if mirror is not None:
                transform.mirror = mirror
        if layer.type == "Dropout" and dropout_ratio is not None:
            layer.dropout_param.dropout_ratio = dropout_ratio
    formats.write_prototxt(dst, net)
    return net


def write_solver(path: Path, net: Path, **fields) -> caffe_pb2.SolverParameter:
    """A solver prototxt for ``net`` with ``fields`` (SolverParameter field names)."""
    solver = caffe_pb2.SolverParameter(net=str(net), solver_mode=caffe_pb2.SolverParameter.CPU)
    for name, value in fields.items():
        if isinstance(value, (list, tuple)):  # repeated fields (test_iter, stepvalue)
            getattr(solver, name).extend(value)
        else:
            setattr(solver, name, value)
    formats.write_prototxt(path, solver)
    return solver
