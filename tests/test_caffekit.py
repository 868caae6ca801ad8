"""caffekit: Caffe formats round-trip, V1 upgrade, Caffe's shape rules."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from caffekit import atomic, formats, graph
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]


def test_datum_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    datum = formats.parse_datum(formats.array_to_datum(image, 4).SerializeToString())
    assert datum.label == 4
    np.testing.assert_array_equal(formats.datum_to_array(datum), image)


def test_mean_file_round_trip_uses_legacy_fields(tmp_path):
    mean = np.random.default_rng(1).random((3, 4, 6), dtype=np.float32) * 255
    formats.write_mean(tmp_path / "mean.binaryproto", mean)
    blob = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 6)
    np.testing.assert_array_equal(formats.read_mean(tmp_path / "mean.binaryproto"), mean)


def test_agenet_shapes_round_pooling_up():
    net = formats.read_net(REPO / "caffe_models/age_net/deploy.prototxt")
    layers = graph.net_layers(net, graph.TEST)
    shapes = graph.blob_shapes(layers, graph.input_shapes(net, layers))
    assert [shapes[b][2] for b in ("conv1", "pool1", "conv2", "pool2", "conv3", "pool5")] == [56, 28, 28, 14, 14, 7]
    assert shapes["prob"] == (1, 9)


def test_pooled_size_matches_caffe():
    assert graph.pooled_size(56, 3, 2, 0) == 28  # floor rounding would give 27
    assert graph.pooled_size(7, 3, 2, 1) == 4


def test_v1_layer_upgrades_lr_and_decay():
    old = caffe_pb2.V1LayerParameter(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION,
                                     bottom=["data"], top=["conv1"], blobs_lr=[1, 2], weight_decay=[1, 0])
    old.convolution_param.num_output = 8
    layer = graph.upgrade_v1_layer(old)
    assert layer.type == "Convolution"
    assert [(p.lr_mult, p.decay_mult) for p in layer.param] == [(1, 1), (2, 0)]
    assert layer.convolution_param.num_output == 8


def test_unsupported_layer_is_named(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }')
    with pytest.raises(KitError, match="'sig'.*'Sigmoid'"):
        graph.net_layers(formats.read_net(path), source=str(path))


def test_truncated_caffemodel_is_a_one_line_error(tmp_path):
    net = caffe_pb2.NetParameter(name="x")
    layer = net.layer.add(name="fc", type="InnerProduct")
    layer.blobs.append(formats.array_to_blob(np.ones((4, 4), np.float32)))
    path = tmp_path / "x.caffemodel"
    path.write_bytes(net.SerializeToString()[:-7])
    with pytest.raises(KitError, match="truncated"):
        formats.read_caffemodel(path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.skipif(shutil.which("protoc") is None, reason="protoc (Debian protobuf-compiler) not installed")
def test_generated_module_matches_proto(tmp_path):
    proto_dir = REPO / "caffekit/proto"
    subprocess.run(["protoc", f"--proto_path={proto_dir}", f"--python_out={tmp_path}", "caffe.proto"], check=True)
    assert (tmp_path / "caffe_pb2.py").read_text() == (proto_dir / "caffe_pb2.py").read_text()
