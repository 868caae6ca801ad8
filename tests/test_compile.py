"""scripts/compile_ir.py and caffekit.openvino_ir on random-weight Caffe nets written by the kit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import caffe_fixtures as cf
from caffekit import models as models_registry
from caffekit import formats, openvino_ir, tasks
from caffekit.errors import KitError

REPO = Path(__file__).resolve().parents[1]
COMPILE = [sys.executable, str(REPO / "scripts" / "compile_ir.py")]


def run(args, **kwargs):
    return subprocess.run([*COMPILE, *map(str, args)], capture_output=True, text=True, cwd=REPO, **kwargs)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both nets with random weights compiled to FP16 and FP32 by the command-line tool."""
    data, models = cf.make_models_dir(tmp_path_factory.mktemp("compile"))
    result = run(["--net", "all", "--data-dir", data, "--models-dir", models, "--precision", "FP16", "FP32"])
    assert result.returncode == 0, result.stderr
    return data, models, result.stdout


@pytest.mark.parametrize("net", ["age_net", "gender_net"])
@pytest.mark.parametrize("precision", ["FP16", "FP32"])
def test_ir_agrees_with_opencv_and_carries_metadata(compiled, net, precision):
    data, models, stdout = compiled
    paths = openvino_ir.ir_paths(models / "ir", net, precision)
    meta = json.loads(paths["json"].read_text())
    task = net[:-4]
    assert meta["labels"] == tasks.labels(task) and meta["task"] == task and meta["precision"] == precision
    assert meta["input"] == {**meta["input"], "shape": [1, 227, 227, 3], "layout": "NHWC", "element_type": "u8",
                             "colour_order": "BGR"}
    assert meta["caffe"]["caffemodel_sha256"] == openvino_ir.sha256(meta["caffe"]["caffemodel"])
    assert meta["mean"]["sha256"] == openvino_ir.sha256(data / "mean.binaryproto")
    if task == "age":
        assert meta["age_bin_edges"] == tasks.AGE_BIN_EDGES and len(meta["age_bin_centres"]) == 9
    assert meta["check"]["max_prob_difference"] <= openvino_ir.TOLERANCE[precision]
    assert f"{precision}: {paths['xml']}" in stdout

    # The check itself, repeated here on other images: the IR (u8 NHWC in) against OpenCV
    # on the caffemodel with the mean subtracted by hand.
    net_ = openvino_ir.CaffeNet(REPO / "caffe_models" / net / "deploy.prototxt", meta["caffe"]["caffemodel"])
    mean = openvino_ir.mean_crop(formats.read_mean(data / "mean.binaryproto"), 227)
    images = openvino_ir.generated_images(227, 3, seed=7)
    ir = openvino_ir.ir_probabilities(openvino_ir.compile_for_cpu(paths["xml"], "f32"), images)
    reference = openvino_ir.opencv_probabilities(net_, mean, images)
    assert ir.max() > 0.3  # random weights scaled to give confident, non-uniform answers
    assert openvino_ir.max_prob_difference(ir, reference) <= openvino_ir.TOLERANCE[precision]
    np.testing.assert_array_equal(np.load(paths["mean"]), mean)


def test_ir_uses_only_opsets_up_to_8(compiled):
    _, models, _ = compiled
    for xml in (models / "ir").glob("*/*/*.xml"):
        ops = openvino_ir.xml_op_versions(xml)
        assert {"MaxPool", "LRN", "SoftMax", "Convolution", "MatMul"} <= {t for _, t, _ in ops}
        assert openvino_ir.newer_ops(xml) == [], xml
        assert openvino_ir.newer_ops(xml, max_opset=1) == [], xml  # first versions only, as MYRIAD knows best


def test_opset_check_rejects_newer_ops(tmp_path):
    xml = tmp_path / "x.xml"
    xml.write_text('<net><layers><layer id="0" name="p" type="Parameter" version="opset1"/>'
                   '<layer id="1" name="s" type="Softmax" version="opset8"/>'
                   '<layer id="2" name="m" type="MaxPool" version="opset14"/></layers></net>')
    assert openvino_ir.newer_ops(xml) == ["m (MaxPool, opset14)"]


def test_fp16_ir_keeps_the_mean_in_f32(compiled):
    _, models, _ = compiled
    import xml.etree.ElementTree as ET

    root = ET.parse(models / "ir/age_net/FP16/age_net.xml").getroot()
    consts = {layer.find("data").get("shape").replace(" ", ""): layer.find("data").get("element_type")
              for layer in root.iter("layer") if layer.get("type") == "Const"}
    assert consts["1,3,227,227"] == "f32"   # the mean image
    assert consts["96,3,7,7"] == "f16"      # conv1 weights


def test_labels_in_rt_info(compiled):
    import openvino as ov

    _, models, _ = compiled
    model = ov.Core().read_model(str(models / "ir/gender_net/FP32/gender_net.xml"))
    assert model.get_rt_info(["agegender", "labels"]).astype(str) == "Male Female"


def test_v1_syntax_deploy_and_caffemodel(tmp_path):
    """The Levi & Hassner files are V1 (`layers { type: CONVOLUTION }`): same IR, same answers."""
    data, models = cf.make_models_dir(tmp_path, tasks=("gender",))
    v2_model = next((models / "gender_net").glob("*.caffemodel"))
    deploy_dir = tmp_path / "v1"
    formats.write_prototxt(deploy_dir / "gender_net" / "deploy.prototxt",
                           cf.to_v1(formats.read_net(REPO / "caffe_models/gender_net/deploy.prototxt")))
    v1_model = tmp_path / "v1.caffemodel"
    formats.write_caffemodel(v1_model, cf.to_v1(formats.read_caffemodel(v2_model)))
    assert "layers {" in (deploy_dir / "gender_net/deploy.prototxt").read_text()
    assert not formats.read_caffemodel(v1_model).layer
    result = run(["--net", "gender", "--data-dir", data, "--models-dir", tmp_path / "out", "--weights", v1_model,
                  "--deploy-dir", deploy_dir, "--precision", "FP32"])
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out/ir/gender_net/FP32/gender_net.json").read_text())
    assert meta["check"]["max_prob_difference"] < 1e-3


OPTIONS_NET = """
name: "Options"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 35 dim: 35 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" relu_param { negative_slope: 0.1 } }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "c2" type: "Convolution" bottom: "p1" top: "c2"
        convolution_param { num_output: 8 kernel_size: 2 group: 2 } }
layer { name: "p2" type: "Pooling" bottom: "c2" top: "p2" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "n2" type: "LRN" bottom: "p2" top: "n2" lrn_param { local_size: 3 alpha: 0.01 beta: 0.75 k: K } }
layer { name: "p3" type: "Pooling" bottom: "n2" top: "p3" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "p3" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def options_net(folder, lrn_k):
    """Layer options AgeNet does not use: padded and average pooling with Caffe's rounding,
    grouped convolution, leaky ReLU, LRN with k != 1, global pooling."""
    deploy = folder / "net" / "deploy.prototxt"
    deploy.parent.mkdir(parents=True)
    deploy.write_text(OPTIONS_NET.replace("k: K", f"k: {lrn_k}"))
    net = openvino_ir.CaffeNet(deploy, cf.write_random_caffemodel(deploy, folder / "w.caffemodel", seed=3))
    # p1: the rounded-up last window overhangs the padding; p2: Caffe drops a window that starts in it.
    assert [net.shapes[b][2] for b in ("c1", "p1", "c2", "p2")] == [18, 10, 9, 5]
    mean = openvino_ir.mean_crop(np.full((3, 40, 40), 120, np.float32), 35)
    images = openvino_ir.generated_images(35, 4, seed=1)
    ir = openvino_ir.ir_probabilities(openvino_ir.compile_for_cpu(openvino_ir.build_model(net, mean), "f32"), images)
    return net, mean, images, ir


def test_layer_options_match_opencv(tmp_path):
    net, mean, images, ir = options_net(tmp_path, lrn_k=1)
    reference = openvino_ir.opencv_probabilities(net, mean, images)
    assert openvino_ir.max_prob_difference(ir, reference) < 1e-4


def test_opencv_check_is_skipped_for_lrn_k_it_ignores(tmp_path):
    net, *_ = options_net(tmp_path, lrn_k=2)
    assert "n2" in openvino_ir.opencv_reference_problem(net)


@pytest.mark.oracle
def test_layer_options_match_real_caffe(tmp_path, caffe_oracle):
    """Real Caffe as the reference, with LRN k=2 (which OpenCV's importer ignores)."""
    import oracle

    net, mean, images, ir = options_net(tmp_path, lrn_k=2)
    blobs = np.stack([image.transpose(2, 0, 1).astype(np.float32) - mean for image in images])
    probs = [oracle.pycaffe_forward(caffe_oracle, net.deploy, tmp_path, ["prob"], net.caffemodel,
                                    inputs={"data": blob[np.newaxis]})["prob"][0] for blob in blobs]
    assert openvino_ir.max_prob_difference(ir, np.concatenate(probs)) < 1e-4


def test_unknown_layer_is_a_clear_error(tmp_path):
    data, models = cf.make_models_dir(tmp_path, tasks=("gender",))
    deploy_dir = tmp_path / "deploy"
    text = (REPO / "caffe_models/gender_net/deploy.prototxt").read_text()
    (deploy_dir / "gender_net").mkdir(parents=True)
    (deploy_dir / "gender_net/deploy.prototxt").write_text(
        text.replace('name: "relu1" type: "ReLU"', 'name: "relu1" type: "Sigmoid"'))
    result = run(["--net", "gender", "--data-dir", data, "--models-dir", models, "--deploy-dir", deploy_dir])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "'relu1'" in result.stderr and "'Sigmoid'" in result.stderr


def test_wrong_weights_missing_snapshot_and_mean_are_clear_errors(tmp_path):
    data, models = cf.make_models_dir(tmp_path)
    gender_weights = next((models / "gender_net").glob("*.caffemodel"))
    result = run(["--net", "age", "--data-dir", data, "--models-dir", models, "--weights", gender_weights])
    assert result.returncode == 2 and "fc8" in result.stderr and str(gender_weights) in result.stderr
    result = run(["--net", "age", "--data-dir", data, "--models-dir", tmp_path / "empty"])
    assert result.returncode == 2 and "no *_iter_N.caffemodel snapshot found" in result.stderr
    result = run(["--net", "age", "--data-dir", tmp_path / "nodata", "--models-dir", models])
    assert result.returncode == 2 and "mean file not found" in result.stderr
    assert not (models / "ir").exists()  # nothing partial left


def test_failed_check_leaves_no_ir(tmp_path, monkeypatch):
    data, models = cf.make_models_dir(tmp_path, tasks=("gender",))
    net = openvino_ir.CaffeNet(REPO / "caffe_models/gender_net/deploy.prototxt",
                               next((models / "gender_net").glob("*.caffemodel")))
    images, source = openvino_ir.check_images(data, "gender", 227, count=2)
    # A reference that disagrees, as a wrongly converted layer would.
    monkeypatch.setattr(openvino_ir, "opencv_outputs", lambda *a: {"prob": np.tile([[0.9, 0.1]], (2, 1))})
    with pytest.raises(KitError, match="differ by"):
        openvino_ir.compile_precision(net, models_registry.model("gender"), "FP32", data / "mean.binaryproto",
                                      models / "ir", images, source)
    assert not (models / "ir/gender_net/FP32").exists()


def test_newest_snapshot_is_the_last_written(tmp_path):
    """A fine-tuning run's 800 beats the 6,000 an earlier run left; among equally new files the highest wins."""
    sys.path.insert(0, str(REPO / "scripts"))
    import compile_ir

    folder = tmp_path / "age_net"
    folder.mkdir()
    for name, mtime in (("age_iter_6000.caffemodel", 100), ("age_iter_400.caffemodel", 200),
                        ("age_iter_800.caffemodel", 200), ("age_iter_200.caffemodel", 150)):
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (mtime, mtime))
    assert compile_ir.newest_snapshot(tmp_path, "age_net").name == "age_iter_800.caffemodel"
    (tmp_path / "gender_net").mkdir()
    with pytest.raises(KitError, match="no \\*_iter_N.caffemodel"):
        compile_ir.newest_snapshot(tmp_path, "gender_net")


@pytest.mark.slow
def test_int8_quantization_reports_accuracy(tmp_path):
    data, models = cf.make_models_dir(tmp_path, tasks=("gender",))
    cf.write_random_dataset(data, "gender", train=30, test=20)
    result = run(["--net", "gender", "--data-dir", data, "--models-dir", models, "--precision", "INT8"])
    assert result.returncode == 0, result.stderr
    meta = json.loads((models / "ir/gender_net/INT8/gender_net.json").read_text())
    q = meta["int8"]
    assert q["calibration_images"] == 30 and q["test_images"] == 20
    assert "INT8:" in result.stdout and "test accuracy" in result.stdout
    # The reported numbers, recomputed from the test LMDB: the INT8 IR through OpenVINO as the runner feeds it
    # (centre 227 crop, u8 BGR NHWC), and the caffemodel through OpenCV (the same crop minus the mean's).
    import cv2
    import lmdb
    import openvino as ov
    from caffekit.proto import caffe_pb2

    with lmdb.open(str(data / "lmdb/gender_test_lmdb"), readonly=True, lock=False) as env, env.begin() as txn:
        datums = [caffe_pb2.Datum.FromString(value) for _, value in txn.cursor()]
    offset = (256 - 227) // 2
    images = np.stack([np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width) for d in datums])
    images = images[:, :, offset:offset + 227, offset:offset + 227]
    labels = np.array([d.label for d in datums])
    int8_ir = ov.Core().compile_model(str(models / "ir/gender_net/INT8/gender_net.xml"), "CPU")
    int8 = np.concatenate([int8_ir([np.ascontiguousarray(image.transpose(1, 2, 0)[np.newaxis])])[0]
                           for image in images])
    caffe = cv2.dnn.readNetFromCaffe(str(REPO / "caffe_models/gender_net/deploy.prototxt"),
                                     meta["caffe"]["caffemodel"])
    mean = formats.read_mean(data / "mean.binaryproto")[:, offset:offset + 227, offset:offset + 227]
    caffe.setInput(images.astype(np.float32) - mean)
    fp32 = caffe.forward().reshape(len(images), -1)
    assert q["int8_accuracy"] == pytest.approx(np.mean(int8.argmax(1) == labels))
    assert q["fp32_accuracy"] == pytest.approx(np.mean(fp32.argmax(1) == labels))
    assert q["agreement_with_fp32"] == pytest.approx(np.mean(int8.argmax(1) == fp32.argmax(1)))
    assert q["agreement_with_fp32"] >= 0.8
    ops = {t for _, t, _ in openvino_ir.xml_op_versions(models / "ir/gender_net/INT8/gender_net.xml")}
    assert "FakeQuantize" in ops
    assert openvino_ir.newer_ops(models / "ir/gender_net/INT8/gender_net.xml") == []


@pytest.mark.slow
def test_compiles_the_newest_snapshot_of_the_trainer(tmp_path):
    """The hand-off from stage 2: scripts/train.py (torch backend) writes snapshots, compile_ir.py finds the
    newest one by itself and converts it."""
    data = tmp_path / "data"
    cf.write_random_mean(data / "mean.binaryproto")
    cf.write_random_dataset(data, "gender", train=60, test=50)
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "caffe_models/gender_net/train_val.prototxt"\ntest_iter: 1\ntest_interval: 1000\n'
                      'base_lr: 0.001\nlr_policy: "fixed"\nmax_iter: 2\nmomentum: 0.9\nweight_decay: 0.0005\n'
                      'snapshot: 1\nsnapshot_prefix: "gender_net"\nsolver_mode: CPU\n')
    models = tmp_path / "models"
    train = subprocess.run([sys.executable, str(REPO / "scripts/train.py"), "--net", "gender", "--backend", "torch",
                            "--data-dir", data, "--models-dir", models, "--solver", solver, "--no-progress"],
                           capture_output=True, text=True, cwd=REPO)
    if train.returncode != 0:
        pytest.fail(f"trainer failed: {train.stderr[-2000:]}")
    result = run(["--net", "gender", "--data-dir", data, "--models-dir", models, "--precision", "FP32"])
    assert result.returncode == 0, result.stderr
    meta = json.loads((models / "ir/gender_net/FP32/gender_net.json").read_text())
    assert Path(meta["caffe"]["caffemodel"]).name == "gender_net_iter_2.caffemodel"
    assert meta["check"]["images"].startswith("8 images of") and meta["check"]["max_prob_difference"] < 1e-3


@pytest.mark.oracle
def test_agenet_ir_matches_real_caffe(compiled, caffe_oracle, tmp_path):
    """The FP32 AgeNet IR, preprocessing included, against pycaffe on the same caffemodel and mean."""
    import oracle

    data, models, _ = compiled
    meta = json.loads((models / "ir/age_net/FP32/age_net.json").read_text())
    deploy = REPO / "caffe_models/age_net/deploy.prototxt"
    mean = openvino_ir.mean_crop(formats.read_mean(data / "mean.binaryproto"), 227)
    images = openvino_ir.generated_images(227, 2, seed=11)
    ir = openvino_ir.ir_probabilities(openvino_ir.compile_for_cpu(models / "ir/age_net/FP32/age_net.xml"), images)
    caffe = [oracle.pycaffe_forward(caffe_oracle, deploy, tmp_path, ["prob"], Path(meta["caffe"]["caffemodel"]),
                                    inputs={"data": image.transpose(2, 0, 1)[np.newaxis] - mean})["prob"][0]
             for image in images]
    assert openvino_ir.max_prob_difference(ir, np.concatenate(caffe)) < 1e-4
