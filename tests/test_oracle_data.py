"""Real Caffe reads the kit's data: its Data layer yields the images and labels our LMDBs
hold, in order, and its compute_image_mean agrees with our mean files."""
import csv
import json
import subprocess
import sys

import lmdb
import numpy as np
import pytest

from caffekit import formats
from caffekit.proto import caffe_pb2

import oracle  # tests/oracle.py: runs the real Caffe

pytestmark = pytest.mark.oracle


def data_layer_net(path, source, batch_size, mean_file=None):
    """A net of one Data layer (TEST phase: no random crop, no mirror)."""
    net = caffe_pb2.NetParameter(name="read_lmdb")
    layer = net.layer.add(name="data", type="Data", top=["data", "label"])
    layer.include.add(phase=caffe_pb2.TEST)
    layer.data_param.source = str(source)
    layer.data_param.batch_size = batch_size
    layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    if mean_file:
        layer.transform_param.mean_file = str(mean_file)
    formats.write_prototxt(path, net)
    return path


@pytest.fixture(scope="module")
def face_lmdb(tmp_path_factory, utkface_dir):
    """An LMDB of 24 real faces at 64x64 written with caffekit.formats.array_to_datum."""
    folder = tmp_path_factory.mktemp("faces")
    images, labels = oracle.load_faces(oracle.face_files(utkface_dir, 24, seed=5), 64, task="age")
    oracle.write_lmdb(folder / "train_lmdb", images, labels)
    return folder, images, labels


def test_data_layer_yields_our_images_and_labels_in_order(caffe_oracle, face_lmdb, tmp_path):
    folder, images, labels = face_lmdb
    net = data_layer_net(tmp_path / "net.prototxt", folder / "train_lmdb", batch_size=len(images))
    # Two passes: the second wraps around to the first record, as Caffe's cursor does.
    out = oracle.pycaffe_forward(caffe_oracle, net, tmp_path, ["data", "label"], passes=2)
    for data, label in zip(out["data"], out["label"]):
        np.testing.assert_array_equal(data, images.astype(np.float32))
        np.testing.assert_array_equal(label, labels.astype(np.float32))
    assert len(set(labels.tolist())) > 1, "the sample should hold more than one class"


def test_data_layer_subtracts_our_mean_file(caffe_oracle, face_lmdb, tmp_path):
    folder, images, labels = face_lmdb
    mean = images.astype(np.float64).mean(axis=0).astype(np.float32)
    formats.write_mean(tmp_path / "mean.binaryproto", mean)
    net = data_layer_net(tmp_path / "net.prototxt", folder / "train_lmdb", len(images), tmp_path / "mean.binaryproto")
    out = oracle.pycaffe_forward(caffe_oracle, net, tmp_path, ["data"])
    # Caffe computes (pixel - mean) in float32, as we do: bit-identical.
    np.testing.assert_array_equal(out["data"][0], images.astype(np.float32) - mean)


def test_compute_image_mean_agrees_with_ours(caffe_oracle, face_lmdb, tmp_path):
    folder, images, _ = face_lmdb
    oracle.run_tool(caffe_oracle, "compute_image_mean", [folder / "train_lmdb", tmp_path / "caffe_mean.binaryproto"],
                    tmp_path)
    caffe_mean = formats.read_mean(tmp_path / "caffe_mean.binaryproto")
    ours = images.astype(np.float64).mean(axis=0)
    # compute_image_mean sums uint8 pixels in float32 (exact below 2^24) and divides once:
    # the only difference is one float32 rounding of values below 256, i.e. < 2e-5.
    assert caffe_mean.shape == ours.shape
    assert np.abs(caffe_mean - ours).max() < 1e-4


# ---------------------------------------------------------------- what `make dataset` writes
@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory, utkface_dir):
    """`python -m dataset.build` on 300 real faces (all races, 64x64 to keep Caffe's reads fast)."""
    root = tmp_path_factory.mktemp("built")
    source = root / "faces"
    source.mkdir()
    for path in oracle.face_files(utkface_dir, 300, seed=3):
        (source / path.name).symlink_to(path)
    proc = subprocess.run([sys.executable, "-m", "dataset.build", "--utkface", str(source), "--out", str(root / "data"),
                           "--race", "all", "--size", "64", "--test-fraction", "0.2", "--seed", "1"],
                          cwd=oracle.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "data"


def lmdb_records(path):
    """{key: raw value} of an LMDB, in key order."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = dict(txn.cursor())
    env.close()
    return records


@pytest.mark.parametrize("name", ["age_train", "age_test", "gender_train", "gender_test"])
def test_data_layer_reads_dataset_build_lmdbs(caffe_oracle, built_dataset, tmp_path, name):
    path = built_dataset / "lmdb" / f"{name}_lmdb"
    images, labels = oracle.read_lmdb(path)
    manifest = json.loads((built_dataset / "manifest.json").read_text())
    assert len(images) == manifest["outputs"][f"lmdb/{name}_lmdb"]["records"]
    net = data_layer_net(tmp_path / "net.prototxt", path, batch_size=len(images))
    out = oracle.pycaffe_forward(caffe_oracle, net, tmp_path, ["data", "label"])
    np.testing.assert_array_equal(out["data"][0], images.astype(np.float32))
    np.testing.assert_array_equal(out["label"][0], labels.astype(np.float32))
    if name.endswith("_test"):  # the CSV lists the test records in the order Caffe reads them
        task = name.split("_")[0]
        with open(built_dataset / f"{task}_test.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["label"]) for r in rows] == out["label"][0].astype(int).tolist()
        assert [r["key"].encode() for r in rows] == list(lmdb_records(path))


def test_compute_image_mean_on_dataset_build_output(caffe_oracle, built_dataset, tmp_path):
    """Our mean.binaryproto is the mean of the train split's original faces, each once, before
    oversampling. So Caffe's compute_image_mean must equal it on an LMDB of those originals
    (only float rounding apart), and on the full oversampled LMDB it must differ by exactly the
    augmented copies' share: n_aug / n_all * (mean of copies - mean of originals)."""
    ours = formats.read_mean(built_dataset / "mean.binaryproto")
    source = built_dataset / "lmdb" / "age_train_lmdb"
    records = lmdb_records(source)
    originals = {k: v for k, v in records.items() if b"~aug" not in k}
    manifest = json.loads((built_dataset / "manifest.json").read_text())
    assert len(originals) == manifest["split"]["train"] < len(records)
    env = lmdb.open(str(tmp_path / "originals_lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key, value in originals.items():
            txn.put(key, value)
    env.close()
    means = {}
    for name, path in (("originals", tmp_path / "originals_lmdb"), ("all", source)):
        oracle.run_tool(caffe_oracle, "compute_image_mean", [path, tmp_path / f"{name}.binaryproto"], tmp_path)
        means[name] = formats.read_mean(tmp_path / f"{name}.binaryproto").astype(np.float64)

    # 1e-3: both sum integer pixels exactly and divide once; what is left is float32 rounding
    # of values below 256 (< 2e-5), far below one grey level.
    assert np.abs(means["originals"] - ours).max() < 1e-3

    images, _ = oracle.read_lmdb(source)
    copies = np.array([b"~aug" in k for k in records])
    n_all, n_aug = len(images), int(copies.sum())
    explained = ours + n_aug / n_all * (images[copies].astype(np.float64).mean(0) - ours)
    difference = means["all"] - ours
    print(f"compute_image_mean(oversampled train LMDB) - mean.binaryproto: max |.| {np.abs(difference).max():.2f}, "
          f"mean |.| {np.abs(difference).mean():.2f} grey levels, per channel (BGR) "
          f"{difference.mean((1, 2)).round(2)}; {n_aug} of {n_all} records are augmented copies")
    assert np.abs(means["all"] - explained).max() < 1e-3
