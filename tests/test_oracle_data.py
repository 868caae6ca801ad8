"""Real Caffe reads the kit's data: its Data layer yields the images and labels our LMDBs
hold, in order, and its compute_image_mean agrees with our mean files."""
import numpy as np
import pytest

from caffekit import formats
from caffekit.proto import caffe_pb2
from tests import oracle

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
