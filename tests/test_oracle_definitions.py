"""Real Caffe runs the kit's network and solver definitions: `caffe train` on
caffe_models/<net>/train_val.prototxt and solver.prototxt, as shipped (only data paths,
batch size and the iteration counts are rewritten, to run a few iterations here)."""
import math

import numpy as np
import pytest

from caffekit import formats

import oracle  # tests/oracle.py: runs the real Caffe

pytestmark = pytest.mark.oracle

NETS = {"age_net": ("age", 9), "gender_net": ("gender", 2)}


@pytest.fixture(scope="module")
def faces_256(tmp_path_factory, utkface_dir):
    """12 train and 4 test faces at 256x256 per task, LMDBs and a mean file, like `make dataset` writes."""
    folder = tmp_path_factory.mktemp("data256")
    files = oracle.face_files(utkface_dir, 16, seed=11)
    for task in ("age", "gender"):
        images, labels = oracle.load_faces(files, 256, task)
        oracle.write_lmdb(folder / f"{task}_train_lmdb", images[:12], labels[:12])
        oracle.write_lmdb(folder / f"{task}_test_lmdb", images[12:], labels[12:])
        formats.write_mean(folder / "mean.binaryproto", images[:12].astype(np.float64).mean(0).astype(np.float32))
    return folder


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_caffe_trains_our_train_val_and_solver(caffe_oracle, faces_256, tmp_path, net_name):
    task, classes = NETS[net_name]
    net_dir = oracle.REPO / "caffe_models" / net_name
    net = oracle.rewrite_train_val(net_dir / "train_val.prototxt", tmp_path / "train_val.prototxt",
                                   faces_256 / f"{task}_train_lmdb", faces_256 / f"{task}_test_lmdb",
                                   faces_256 / "mean.binaryproto", batch_size=4)
    solver = formats.read_solver(net_dir / "solver.prototxt")
    # Keep the shipped schedule (lr, policy, momentum, decay); run 3 iterations, test at 2.
    solver.net = str(tmp_path / "train_val.prototxt")
    solver.max_iter, solver.display, solver.test_interval = 3, 1, 2
    del solver.test_iter[:]
    solver.test_iter.append(1)
    solver.snapshot, solver.snapshot_prefix = 0, str(tmp_path / net_name)
    formats.write_prototxt(tmp_path / "solver.prototxt", solver)

    log = oracle.caffe_train(caffe_oracle, tmp_path / "solver.prototxt", tmp_path)
    with oracle.shown_on_failure("caffe train log", log):
        losses = oracle.parse_losses(log)
        # Iterations 0..2, and 3: Caffe's closing forward pass after the last update.
        assert sorted(losses) == [0, 1, 2, 3]
        assert all(math.isfinite(v) and v > 0 for v in losses.values())
        # A fresh net guesses uniformly: the first loss is near log(classes).
        assert abs(losses[0] - math.log(classes)) < 0.5 * math.log(classes)
        tests = oracle.parse_test_outputs(log)
        assert 0 in tests and 2 in tests and "accuracy" in tests[2] and "loss" in tests[2]
        assert "Optimization Done" in log
        # Caffe's snapshot after training: our reader knows every learnable layer of the prototxt.
        model = formats.read_caffemodel(tmp_path / f"{net_name}_iter_3.caffemodel")
        learnable = [layer.name for layer in net.layer if layer.type in ("Convolution", "InnerProduct")]
        assert [layer.name for layer in model.layer if layer.blobs] == learnable
