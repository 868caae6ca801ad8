"""The layer table: every type it lists has a computation in each backend, and the new types follow Caffe's
semantics where a wrong implementation would show (BatchNorm's moving sums, folding BatchNorm into the IR)."""
import numpy as np
import pytest
import torch

from caffekit import formats, graph, layers, openvino_ir, torchnet
from caffekit.layers import openvino_ops, torch_ops

REPO = openvino_ir.Path(__file__).resolve().parents[1]


def test_each_backend_maps_every_type_the_table_lists():
    compute = {name for name, spec in layers.TYPES.items() if spec.role != "data"}
    assert compute - set(torch_ops.OPS) == set(), "torch lacks a mapping"
    deploy = {name for name, spec in layers.TYPES.items() if spec.role == "compute"}
    assert deploy - set(openvino_ops.OPS) == set(), "OpenVINO lacks a mapping"
    assert set(graph.SUPPORTED_TYPES) == set(layers.TYPES)


BN_NET = """
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "y" batch_norm_param { moving_average_fraction: 0.5 } }
"""


def test_batch_norm_keeps_caffes_moving_sums(tmp_path):
    """Two TRAIN passes: blob 2 = 0.5 * 1 + 1, blob 0 = 0.5 * mean1 + mean2, blob 1 the same with the
    m / (m - 1) corrected variances; TEST then divides by blob 2. Torch's own running stats would differ."""
    path = tmp_path / "bn.prototxt"
    path.write_text(BN_NET)
    net = formats.read_net(path)
    batches = [np.random.default_rng(i).normal(3 * i, 1 + i, (4, 2, 3, 3)).astype(np.float32) for i in range(2)]
    train = torchnet.CaffeNet(net, graph.TRAIN, {"data": (4, 2, 3, 3)})
    for batch in batches:
        y = train({"data": torch.from_numpy(batch)})["y"].detach().numpy()
    m = 4 * 3 * 3
    mean = [b.mean(axis=(0, 2, 3)) for b in batches]
    var = [b.var(axis=(0, 2, 3)) for b in batches]
    np.testing.assert_allclose(y, (batches[1] - mean[1][None, :, None, None])
                               / np.sqrt(var[1][None, :, None, None] + 1e-5), atol=1e-4)
    mean_sum, var_sum, weight_sum = (p.detach().numpy() for p in train.layer_params("bn"))
    assert weight_sum[0] == pytest.approx(1.5)
    np.testing.assert_allclose(mean_sum, 0.5 * mean[0] + mean[1], rtol=1e-5)
    np.testing.assert_allclose(var_sum, (0.5 * var[0] + var[1]) * m / (m - 1), rtol=1e-4)
    test = torchnet.CaffeNet(net, graph.TEST, {"data": (4, 2, 3, 3)})
    test.load_weights(train.weights(), "train")
    out = test({"data": torch.from_numpy(batches[0])})["y"].numpy()
    expected = (batches[0] - (mean_sum / 1.5)[None, :, None, None]) / np.sqrt((var_sum / 1.5)[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-4)


BN_SCALE_NET = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" batch_norm_param { moving_average_fraction: 0.5 } }
layer { name: "sc" type: "Scale" bottom: "c" top: "c"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 } bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "bn2" type: "BatchNorm" bottom: "c" top: "n" }
layer { name: "sc2" type: "Scale" bottom: "n" top: "s" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "n" bottom: "s" top: "y" }
"""


def test_batch_norm_runs_fused_with_its_in_place_scale_and_computes_what_the_two_layers_do(tmp_path):
    """The trainer runs a BatchNorm and the Scale working in place on its top as one op (torch_ops.batch_norm);
    a Scale writing elsewhere stays apart, as the BatchNorm's own top is read again (by "sum"). Fused and
    layer by layer give the same tops, gradients and moving sums, over two TRAIN steps and in TEST."""
    path = tmp_path / "bn_scale.prototxt"
    path.write_text(BN_SCALE_NET)
    net = formats.read_net(path)
    shape = (6, 3, 7, 7)
    fused = torchnet.CaffeNet(net, graph.TRAIN, {"data": shape}, seed=3)
    assert [(layer.name, scale.name if scale else None) for layer, scale in fused.steps] == [
        ("conv", None), ("bn", "sc"), ("bn2", None), ("sc2", None), ("sum", None)]
    apart = torchnet.CaffeNet(net, graph.TRAIN, {"data": shape}, seed=3)
    apart.steps = torchnet.execution_steps(apart.layers, fuse=False)
    for step in range(2):
        x = torch.from_numpy(np.random.default_rng(step).normal(2, 3, shape).astype(np.float32))
        outputs = []
        for model in (fused, apart):
            for p in model.params():
                p.grad = None
            y = model({"data": x})["y"]
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outputs.append((y.detach(), [p.grad.clone() if p.grad is not None else p.detach().clone()
                                         for p in model.params()]))
        torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(outputs[0][1], outputs[1][1]):  # (the conv bias's gradient is 0 but for rounding)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    tests = []
    for model in (fused, apart):
        test = torchnet.CaffeNet(net, graph.TEST, {"data": shape}, seed=3)
        test.load_weights(model.weights(), "train")
        tests.append(test({"data": x})["y"].detach())
    torch.testing.assert_close(tests[0], tests[1], rtol=1e-5, atol=1e-5)


def test_batch_norm_and_scale_fold_into_the_convolutions(tmp_path):
    """The joint deploy net with random BatchNorm statistics: the IR has no op left of them but the input
    scale, and gives what torch's unfolded net gives."""
    deploy = REPO / "caffe_models" / "joint_net" / "deploy.prototxt"
    net_param = formats.read_net(deploy)
    model = torchnet.CaffeNet(net_param, graph.TEST, {"data": (1, 3, 64, 64)}, seed=2)
    rng = np.random.default_rng(0)
    weights = model.weights()
    for name, blobs in weights.items():
        if name.endswith("_bn"):
            blobs[0][:] = rng.normal(0, 2, blobs[0].shape) * 3
            blobs[1][:] = rng.uniform(0.5, 4, blobs[1].shape) * 3
            blobs[2][:] = 3
        if name.endswith("_scale") and name != "data_scale":
            blobs[0][:] = rng.uniform(0.5, 1.5, blobs[0].shape)
            blobs[1][:] = rng.normal(0, 0.3, blobs[1].shape)
    weights["age_bins"] = [np.eye(9, 101, dtype=np.float32)]
    weights["age_years"] = [np.arange(101, dtype=np.float32)[None]]
    model.load_weights(weights, "random")
    layers_ = graph.net_layers(net_param, graph.TEST)
    caffemodel = tmp_path / "joint_iter_1.caffemodel"
    formats.write_caffemodel(caffemodel, graph.weights_to_model("JointNet", layers_, weights))
    net = openvino_ir.CaffeNet(deploy, caffemodel)
    folded, _ = openvino_ir.fold_batch_norm(net.layers, net.weights)
    assert [layer.name for layer in folded if layer.type in ("BatchNorm", "Scale")] == ["data_scale"]
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mean = np.full((3, 64, 64), 110, np.float32)
    ir = openvino_ir.ir_outputs(openvino_ir.compile_for_cpu(openvino_ir.build_model(net, mean), "f32"), [image])
    with torch.no_grad():
        ours = model({"data": torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) - mean)})
    for name in ("age_bins", "age_years", "gender"):
        np.testing.assert_allclose(ir[name], ours[name].numpy().reshape(1, -1), rtol=1e-3, atol=1e-4)


def test_net_cost_counts_agenet_as_published_and_keeps_the_joint_net_in_budget():
    """AgeNet's 0.71 G multiply-adds and 11.4 M parameters are known (design notes); the joint net's
    budget is 0.2 G and 3 M for both tasks."""
    from caffekit.cost import net_cost

    age = net_cost(REPO / "caffe_models" / "age_net" / "deploy.prototxt")
    assert round(age["macs"] / 1e9, 2) == 0.71 and round(age["params"] / 1e6, 1) == 11.4
    joint = net_cost(REPO / "caffe_models" / "joint_net" / "deploy.prototxt")
    assert joint["macs"] <= 0.2e9 and joint["params"] <= 3e6
    assert joint["macs"] * 10 < age["macs"]
