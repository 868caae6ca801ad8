"""Data-parallel training under torchrun (caffekit/distributed.py): two gloo workers of batch B take the steps
of one process with batch 2B, rank 0 alone writes and prints, and the snapshot of a two-worker run resumes in
two workers and in one process.

The net is the shipped GenderNet's train_val (random crop and mirror on) in a test copy with two changes: the
dropout ratio 0, since two masks over B images cannot equal one mask over 2B, and 112 crops of 128 images
instead of 227 of 256, a quarter of the cost (the layers are the shipped ones; fc6 just sees 3 x 3, not 6 x 6). It has no BatchNorm, whose batch statistics over B are not those over 2B (in Caffe either), so
the choice about BatchNorm's running statistics (each worker keeps its own) cannot move these numbers.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffekit import distributed, formats, graph, training
from caffekit.backends.torch import TorchBackend
from caffekit.errors import KitError
from caffekit.lmdb_data import DataLayer
from caffekit.proto import caffe_pb2
from caffe_fixtures import write_lmdb
from train_fixtures import REPO, make_dataset, small_solver

pytestmark = pytest.mark.slow

UTKFACE = REPO.parent / "shared" / "data" / "utkface"
TRAIN_PY = REPO / "scripts" / "train.py"
B = 2           # each worker's batch; the one-process run has 2B
SIZE, CROP = 128, 112
ITERS = 4
SNAPSHOT = 2    # the snapshot resumed from
# fp32 throughout (--precision fp32: auto would pick bf16 on an AVX512-BF16 CPU). The two runs add the same
# numbers in another order (convolutions over 2 images or 4, gloo's sum of two gradients), which moves the last
# of float32's 7 digits: measured, the logged losses (6 digits) were equal and the weights after 4 steps 4e-9
# apart (weights of 1e-2 to 1). Tolerances: one unit in the 6th logged digit, and 25 float32 ulps of a 0.04
# weight. A wrong record, crop, mirror or gradient scale moves the losses in the 2nd or 3rd digit.
LOSS_RTOL = 2e-5
WEIGHT_ATOL = 1e-7

# Run by torchrun in place of scripts/train.py: every worker but rank 0 reports each file it opens for writing,
# renames, removes or creates under WATCH (Python's audit hooks see them all), then runs the real script.
WATCHER = '''
import atexit, os, runpy, sys

watch, report, script = sys.argv[1:4]
sys.argv[:4] = [script]
if os.environ["RANK"] != "0":
    writes = []
    EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.symlink", "os.truncate", "shutil.rmtree")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \\
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        else:
            path, writing = args[0] if args else None, event in EVENTS
        if writing and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(watch):
            writes.append(f"{event} {os.fsdecode(path)}")

    def save():
        with open(report, "w") as f:
            f.write("".join(line + "\\n" for line in writes))

    sys.addaudithook(hook)
    atexit.register(save)
runpy.run_path(script, run_name="__main__")
'''


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def losses(out, column="loss"):
    """{iteration: value} of one column of train_log.csv."""
    return {int(r["iter"]): float(r[column]) for r in read_log(out / "train_log.csv") if r[column]}


def assert_same_losses(got, expected, column="loss"):
    assert sorted(got) == sorted(expected), (got, expected)
    np.testing.assert_allclose([got[i] for i in sorted(got)], [expected[i] for i in sorted(got)], rtol=LOSS_RTOL,
                               err_msg=column)


def assert_same_weights(a, b):
    got, expected = (graph.read_weights(formats.read_caffemodel(path)) for path in (a, b))
    assert sorted(got) == sorted(expected)
    for name in expected:
        for x, y in zip(got[name], expected[name]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=WEIGHT_ATOL, err_msg=name)


def gender_net(folder: Path, train_batch: int) -> Path:
    """The shipped GenderNet train_val with a TRAIN batch of ``train_batch``, CROP, dropout off, and a TEST
    batch of 2B in every run (rank 0 tests alone, on the same batches as one process)."""
    net = formats.read_net(REPO / "caffe_models" / "gender_net" / "train_val.prototxt")
    for layer in net.layer:
        if layer.type == "Data":
            train = layer.include[0].phase == caffe_pb2.TRAIN
            layer.data_param.batch_size = train_batch if train else 2 * B
            layer.transform_param.crop_size = CROP
        if layer.type == "Dropout":
            layer.dropout_param.dropout_ratio = 0.0
    path = folder / f"gender_net_batch{train_batch}.prototxt"
    formats.write_prototxt(path, net)
    return path


def solver(folder: Path, train_batch: int) -> Path:
    return small_solver(folder / f"solver_batch{train_batch}.prototxt", net=str(gender_net(folder, train_batch)),
                        base_lr=0.002, max_iter=ITERS, snapshot=SNAPSHOT, display=1, test_iter=1,
                        test_interval=SNAPSHOT, random_seed=7, snapshot_prefix='"gender_net"')


def torchrun(work: Path, *args) -> dict:
    """scripts/train.py under `torchrun --standalone --nproc-per-node=2` (a free port), each worker's output in
    its own log; returns those outputs and what rank 1 wrote under ``work``."""
    watcher, report, logs = work / "watcher.py", work / "rank1_writes.txt", work / "torchrun_logs"
    work.mkdir(parents=True, exist_ok=True)
    watcher.write_text(WATCHER)
    models = work / "models"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--log-dir", str(logs), "--redirects", "3", str(watcher), str(models), str(report), str(TRAIN_PY),
               "--backend", "torch", "--no-progress", "--precision", "fp32", "--net", "gender",
               "--models-dir", str(models), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    outputs = {}
    for rank in (0, 1):
        (folder,) = logs.glob(f"*/attempt_0/{rank}")
        outputs[rank] = {name: (folder / f"{name}.log").read_text() for name in ("stdout", "stderr")}
    assert proc.returncode == 0, proc.stderr[-2000:] + outputs[0]["stderr"][-2000:] + outputs[1]["stderr"][-2000:]
    return {"out": models / "gender_net", "outputs": outputs,
            "rank1_writes": report.read_text() if report.is_file() else None}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    faces = UTKFACE if UTKFACE.is_dir() else None
    return make_dataset(tmp_path_factory.mktemp("data"), faces, train=48, test=8, size=SIZE)


@pytest.fixture(scope="module")
def two_workers(data, tmp_path_factory):
    """ITERS iterations of two gloo workers of batch B, snapshots every SNAPSHOT."""
    work = tmp_path_factory.mktemp("two_workers")
    run = torchrun(work, "--data-dir", data, "--solver", solver(work, B))
    run["work"] = work
    return run


def one_process(data, work: Path, **config) -> Path:
    """The same training in this process, batch 2B; its output folder."""
    config = training.RunConfig(net="gender_net", solver=str(solver(work, 2 * B)), data_dir=str(data),
                                models_dir=str(work / "models"), precision="fp32", **config)
    TorchBackend(progress=False).train(config)
    return work / "models" / "gender_net"


def test_two_workers_of_batch_b_step_as_one_process_of_batch_2b(two_workers, data, tmp_path):
    alone = one_process(data, tmp_path)
    together = two_workers["out"]
    assert_same_losses(losses(together), losses(alone))
    assert len(set(losses(alone).values())) == ITERS  # real steps on changing batches
    # Rank 0 tests alone on the whole TEST batch: the numbers of a one-process test.
    assert sorted(losses(together, "test_loss")) == [0, 2, 4]
    assert_same_losses(losses(together, "test_loss"), losses(alone, "test_loss"), "test_loss")
    assert_same_weights(together / f"gender_net_iter_{ITERS}.caffemodel", alone / f"gender_net_iter_{ITERS}.caffemodel")
    config = training.read_config(together)
    assert config["extra"]["distributed"] == {"workers": 2, "backend": "gloo", "batch_per_worker": B,
                                              "effective_batch": 2 * B}


def test_rank_0_alone_writes_and_prints(two_workers):
    outputs = two_workers["outputs"]
    assert outputs[1] == {"stdout": "", "stderr": ""}
    assert two_workers["rank1_writes"] == ""  # the audit hook ran (it writes its report) and saw nothing
    lines = outputs[0]["stdout"].splitlines()
    assert lines.count(f"distributed: 2 workers (gloo), effective batch 2 x {B}") == 1, lines
    assert sum(line.startswith("Iteration 0, loss = ") for line in lines) == 1, lines
    names = {p.name for p in two_workers["out"].iterdir()}
    snapshots = {f"gender_net_iter_{i}.{kind}" for i in (SNAPSHOT, ITERS) for kind in ("caffemodel", "solverstate")}
    assert names == snapshots | {"train_log.csv", "learning_curve.png", "config.json", "solver.prototxt",
                                 "train_val.prototxt"}


def test_two_worker_snapshot_resumes_in_one_process_and_in_two_workers(two_workers, data, tmp_path):
    """From the iteration-2 snapshot: one process of batch 2B and two workers of B both continue as the
    uninterrupted two-worker run did."""
    start = two_workers["out"] / f"gender_net_iter_{SNAPSHOT}.solverstate"
    straight = {i: v for i, v in losses(two_workers["out"]).items() if i >= SNAPSHOT}
    final = two_workers["out"] / f"gender_net_iter_{ITERS}.caffemodel"
    alone = one_process(data, tmp_path / "one", resume=str(start))
    together = torchrun(tmp_path / "two", "--data-dir", data, "--solver", solver(tmp_path, B), "--resume", start)
    for out in (alone, together["out"]):
        assert_same_losses(losses(out), straight)
        assert_same_weights(out / f"gender_net_iter_{ITERS}.caffemodel", final)
        assert not (out / f"gender_net_iter_{SNAPSHOT}.caffemodel").exists()  # started there


def test_workers_split_each_group_of_batches_and_keep_data_layers_aligned(tmp_path):
    """The joint net's two TRAIN Data layers (images, and genders in a second LMDB of the same key order), as
    two workers and as one process of twice the batch: worker r's batch is the r-th half of the big batch,
    the same records with the same crops and mirrors, and on each worker the second LMDB's records are the
    images' records."""
    count, size = 40, 72  # 64 crops from 72: random offsets and mirrors
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    formats.write_mean(tmp_path / "mean.binaryproto", images.mean(axis=0).astype(np.float32))
    net = formats.read_net(REPO / "caffe_models" / "joint_net" / "train_val.prototxt")
    layers = training.data_layers(net, "joint_net")[graph.TRAIN]
    assert [layer.name for layer in layers] == ["data", "gender_data"]

    def built(batch, shard):
        # A copy of the LMDBs for each: LMDB opens an environment once per process, as each worker does.
        folder = tmp_path / f"batch{batch}_worker{shard[0]}"
        write_lmdb(folder / "images", images, range(count))  # each record's label: its position
        write_lmdb(folder / "labels", np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1), range(count))
        out = []
        for layer, source in zip(layers, (folder / "images", folder / "labels")):
            copy = caffe_pb2.LayerParameter()
            copy.CopyFrom(layer)
            copy.data_param.batch_size = batch
            out.append(DataLayer(copy, train=True, seed=5, source_path=source, mean_path=tmp_path / "mean.binaryproto",
                                 shard=shard))
        return out

    workers = [built(4, (rank, 2)) for rank in (0, 1)]
    alone = built(8, (0, 1))
    for index in (0, 1, 4):  # index 4 wraps around the 40 records
        whole = [layer.batch(index) for layer in alone]
        for rank, shard in enumerate(workers):
            (data, image_labels), (pixels, gender_labels) = (layer.batch(index) for layer in shard)
            mine = slice(4 * rank, 4 * rank + 4)
            np.testing.assert_array_equal(data, whole[0][0][mine])
            np.testing.assert_array_equal(image_labels, whole[0][1][mine])
            np.testing.assert_array_equal(image_labels, gender_labels)  # aligned: the same records
            np.testing.assert_array_equal(pixels[:, 0, 0, 0], image_labels)
            expected = [(8 * index + 4 * rank + i) % count for i in range(4)]
            assert image_labels.tolist() == expected


def test_workers_come_from_torchruns_environment():
    assert distributed.from_environment({}) == distributed.Workers(0, 0, 1)
    w = distributed.from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (w.rank, w.local_rank, w.size, w.main, w.distributed) == (3, 1, 4, False, True)
    with pytest.raises(KitError, match="RANK=4, LOCAL_RANK=0, WORLD_SIZE=4"):
        distributed.from_environment({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "4"})
    with pytest.raises(KitError, match="WORLD_SIZE='two'"):
        distributed.from_environment({"WORLD_SIZE": "two"})
