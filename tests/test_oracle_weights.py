"""Real Caffe and the kit exchange weights: pycaffe loads caffemodels that caffekit writes and
computes the same outputs as OpenCV's Caffe importer and the kit's torch model (FP32, 1e-4);
a caffemodel that `caffe train` writes reads back through caffekit to the same outputs."""
import cv2
import numpy as np
import pytest

from caffekit import formats, graph

import caffe_fixtures as cf
import oracle  # tests/oracle.py: runs the real Caffe

pytestmark = pytest.mark.oracle

NETS = ("age_net", "gender_net")
BATCH = 4
TOLERANCE = 1e-4  # the FP32 bar, on probabilities and on logits scaled to their range


def deploy_path(net_name):
    return oracle.REPO / "caffe_models" / net_name / "deploy.prototxt"


def random_weights(net_name, seed):
    """Weights with unit-variance activations (fan-in scaling), so LRN, ReLU and softmax all
    work away from their trivial regimes; fc8 is scaled so probabilities are neither uniform
    nor saturated."""
    net = formats.read_net(deploy_path(net_name))
    layers = graph.net_layers(net, graph.TEST)
    shapes = graph.blob_shapes(layers, graph.input_shapes(net, layers))
    return net, layers, cf.random_weights(layers, shapes, seed, logit_scale=0.02, bias_std=0.1)


@pytest.fixture(scope="module")
def face_batch(utkface_dir):
    """4 real faces as the deploy net sees them: 256x256 BGR minus the mean image, centre 227 crop."""
    images, _ = oracle.load_faces(oracle.face_files(utkface_dir, 16, seed=23), 256)
    mean = images.astype(np.float64).mean(0).astype(np.float32)
    offset = (256 - 227) // 2
    crop = (images[:BATCH].astype(np.float32) - mean)[:, :, offset:offset + 227, offset:offset + 227]
    return np.ascontiguousarray(crop)


def opencv_forward(deploy, caffemodel, batch):
    net = cv2.dnn.readNetFromCaffe(str(deploy), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.setInput(batch)
    fc8, prob = net.forward(["fc8", "prob"])
    return fc8.reshape(len(batch), -1), prob.reshape(len(batch), -1)


def torch_forward(deploy, weights, batch):
    torch = pytest.importorskip("torch", reason="torch (the embedded backend) is not installed")
    from caffekit.torchnet import CaffeNet

    net = formats.read_net(deploy)
    model = CaffeNet(net, graph.TEST, {"data": tuple(batch.shape)}, source=str(deploy))
    model.load_weights(weights, source="test weights", require_all=True)
    model.eval()
    with torch.no_grad():
        blobs = model({"data": torch.from_numpy(batch)})
    return blobs["fc8"].numpy(), blobs["prob"].numpy()


def assert_outputs_match(name, reference, other):
    ref_fc8, ref_prob = reference
    fc8, prob = other
    scale = max(1.0, float(np.abs(ref_fc8).max()))
    fc8_diff = float(np.abs(fc8 - ref_fc8).max()) / scale
    prob_diff = float(np.abs(prob - ref_prob).max())
    print(f"{name}: max |fc8 diff| / max(1, |fc8|) = {fc8_diff:.2e}, max |prob diff| = {prob_diff:.2e}")
    assert fc8_diff < TOLERANCE and prob_diff < TOLERANCE, name
    np.testing.assert_array_equal(prob.argmax(1), ref_prob.argmax(1))


def assert_not_trivial(prob):
    """Probabilities that would hide a wrong net: uniform, or saturated at one class."""
    assert prob.max() < 0.999 and prob.std(1).min() > 1e-3, prob


@pytest.mark.parametrize("net_name", NETS)
def test_pycaffe_loads_caffekit_model_and_matches_opencv_and_torch(caffe_oracle, face_batch, tmp_path, net_name):
    net, layers, weights = random_weights(net_name, seed=len(net_name))
    caffemodel = tmp_path / f"{net_name}.caffemodel"
    formats.write_caffemodel(caffemodel, graph.weights_to_model(net.name, layers, weights))

    caffe = oracle.pycaffe_forward(caffe_oracle, deploy_path(net_name), tmp_path, ["fc8", "prob"],
                                   weights=caffemodel, inputs={"data": face_batch})
    # pycaffe holds exactly the blobs we wrote.
    assert sorted(caffe["params"]) == sorted(weights)
    for layer, arrays in weights.items():
        for ours, theirs in zip(arrays, caffe["params"][layer]):
            np.testing.assert_array_equal(theirs.reshape(ours.shape), ours)
    reference = (caffe["fc8"][0].reshape(BATCH, -1), caffe["prob"][0].reshape(BATCH, -1))
    assert_not_trivial(reference[1])
    assert_outputs_match("OpenCV vs Caffe", reference, opencv_forward(deploy_path(net_name), caffemodel, face_batch))
    assert_outputs_match("torch vs Caffe", reference, torch_forward(deploy_path(net_name), weights, face_batch))


@pytest.fixture(scope="module")
def caffe_snapshot(caffe_oracle, tmp_path_factory, utkface_dir):
    """A caffemodel written by `caffe train` (GenderNet, 2 iterations of 4 faces, started from
    random weights whose outputs are not trivial; a small lr keeps them so, as these weights see
    unnormalized activations and large gradients)."""
    folder = tmp_path_factory.mktemp("caffe_snapshot")
    net, layers, weights = random_weights("gender_net", seed=3)
    formats.write_caffemodel(folder / "init.caffemodel", graph.weights_to_model(net.name, layers, weights))
    images, labels = oracle.load_faces(oracle.face_files(utkface_dir, 8, seed=31), 227, task="gender")
    oracle.write_lmdb(folder / "train_lmdb", images, labels)
    formats.write_mean(folder / "mean.binaryproto", images.astype(np.float64).mean(0).astype(np.float32))
    oracle.rewrite_train_val(oracle.REPO / "caffe_models/gender_net/train_val.prototxt", folder / "train_val.prototxt",
                             folder / "train_lmdb", folder / "train_lmdb", folder / "mean.binaryproto",
                             batch_size=4, crop_size=0)
    oracle.write_solver(folder / "solver.prototxt", folder / "train_val.prototxt", base_lr=1e-6, lr_policy="fixed",
                        momentum=0.9, weight_decay=5e-4, max_iter=2, display=1, random_seed=7,
                        snapshot_prefix=str(folder / "gender_net"))
    log = oracle.caffe_train_from(caffe_oracle, folder / "solver.prototxt", folder, folder / "init.caffemodel")
    assert "Optimization Done" in log
    trained = graph.read_weights(formats.read_caffemodel(folder / "gender_net_iter_2.caffemodel"))
    # Caffe started from our weights (a few small steps away) and updated them.
    for layer, arrays in weights.items():
        change = np.linalg.norm(trained[layer][0] - arrays[0]) / np.linalg.norm(arrays[0])
        print(f"{layer}: |Caffe's 2 updates| / |initial weights| = {change:.2e}")
        assert 0 < change < 0.5, layer  # a fresh random draw would be ~1.4 away
    return folder / "gender_net_iter_2.caffemodel"


def test_caffe_written_model_reads_back_through_caffekit(caffe_oracle, caffe_snapshot, face_batch, tmp_path):
    deploy = deploy_path("gender_net")
    weights = graph.read_weights(formats.read_caffemodel(caffe_snapshot))
    caffe = oracle.pycaffe_forward(caffe_oracle, deploy, tmp_path, ["fc8", "prob"], weights=caffe_snapshot,
                                   inputs={"data": face_batch})
    # caffekit reads exactly the blobs Caffe holds.
    assert sorted(weights) == sorted(caffe["params"])
    for layer, arrays in weights.items():
        for ours, theirs in zip(arrays, caffe["params"][layer]):
            np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)
    net = formats.read_net(deploy)
    layers = graph.net_layers(net, graph.TEST)
    graph.check_weights(layers, graph.blob_shapes(layers, graph.input_shapes(net, layers)), weights,
                        str(caffe_snapshot))
    reference = (caffe["fc8"][0].reshape(BATCH, -1), caffe["prob"][0].reshape(BATCH, -1))
    assert_not_trivial(reference[1])
    assert_outputs_match("torch (caffekit-read Caffe snapshot) vs Caffe", reference,
                         torch_forward(deploy, weights, face_batch))
    # And caffekit writes the weights it read back into a caffemodel OpenCV computes the same from.
    rewritten = tmp_path / "rewritten.caffemodel"
    formats.write_caffemodel(rewritten, graph.weights_to_model(net.name, layers, weights))
    assert_outputs_match("OpenCV (caffekit-rewritten Caffe snapshot) vs Caffe", reference,
                         opencv_forward(deploy, rewritten, face_batch))
