"""The torch backend on a CUDA GPU: the joint net (BatchNorm, two Data layers, InfogainLoss) trains a few
iterations in each precision (bf16 or fp16 as chosen, fp16 with its GradScaler, fp32), through the pinned,
prefetched, side-stream feed; in fp32 it takes the CPU's steps. Skipped, saying so, where torch sees no GPU."""
import csv

import numpy as np
import pytest
import torch

from caffekit import formats, models, training
from caffekit.backends.torch import TorchBackend
from caffe_fixtures import write_lmdb
from train_fixtures import REPO, small_solver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: torch.cuda.is_available() is False on this machine")

ITERS = 5
# The GPU's convolutions (cuDNN, TF32 off) add in another order than oneDNN's, and BatchNorm divides by the
# batch's spread, which amplifies that; 5 steps at base_lr 0.01 stay well inside 1e-3.
CPU_RTOL = 1e-3


def joint_data(folder, train=96, test=20, size=64, seed=0):
    """DATA_DIR as `make dataset` lays out the joint net's files: image LMDBs labelled with the age in years,
    gender LMDBs of 1x1x1 Datums in the same key order, the mean and the infogain matrix (random images)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
        ages, genders = rng.integers(0, 100, count), rng.integers(0, 2, count)
        write_lmdb(folder / "lmdb" / f"joint_{split}_lmdb", images, ages)
        write_lmdb(folder / "lmdb" / f"joint_{split}_gender_lmdb", genders.astype(np.uint8).reshape(-1, 1, 1, 1),
                   genders)
        if split == "train":
            formats.write_mean(folder / "joint_mean.binaryproto", images.mean(axis=0).astype(np.float32))
    matrix = models.infogain_matrix()[np.newaxis, np.newaxis]
    (folder / "joint_infogain.binaryproto").write_bytes(formats.array_to_blob(matrix).SerializeToString())
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("cuda")
    data = joint_data(work / "data")
    net = formats.read_net(REPO / "caffe_models" / "joint_net" / "train_val.prototxt")
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = 16
        if layer.type == "Dropout":  # CPU and GPU draw different masks: off, so their steps compare
            layer.dropout_param.dropout_ratio = 0.0
    formats.write_prototxt(work / "train_val.prototxt", net)
    solver = small_solver(work / "solver.prototxt", net=str(work / "train_val.prototxt"), base_lr=0.01,
                          max_iter=ITERS, snapshot=0, display=1, test_iter=1, test_interval=ITERS,
                          snapshot_prefix='"joint_net"')
    return work, data, solver


def train(setup, name, device, precision):
    work, data, solver = setup
    config = training.RunConfig(net="joint_net", solver=str(solver), data_dir=str(data),
                                models_dir=str(work / name), device=device, precision=precision)
    TorchBackend(progress=False).train(config)
    out = work / name / "joint_net"
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return config, [float(r["loss"]) for r in rows if r["loss"]], out


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_trains_on_cuda(setup, precision):
    config, losses, out = train(setup, f"cuda_{precision}", "cuda", precision)
    assert config.extra["device_used"].startswith("cuda")
    expected = {"fp16": "fp16", "fp32": "fp32"}.get(precision, "bf16" if torch.cuda.get_device_capability()[0] >= 8
                                                     else "fp16")
    assert config.extra["precision_used"] == expected
    assert len(losses) == ITERS and all(np.isfinite(losses))
    assert (out / f"joint_net_iter_{ITERS}.caffemodel").is_file()


def test_fp32_on_cuda_takes_the_cpus_steps(setup):
    _, on_gpu, _ = train(setup, "gpu_fp32", "cuda", "fp32")
    _, on_cpu, _ = train(setup, "cpu_fp32", "cpu", "fp32")
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=CPU_RTOL)
