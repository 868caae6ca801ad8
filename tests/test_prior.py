"""caffekit.prior: the train split's class prior given back to a net trained on the oversampled LMDB,
checked through OpenCV's Caffe importer (an engine independent of the correction)."""
import json

import cv2
import numpy as np
import pytest

import caffe_fixtures as cf
from caffekit import formats, graph, prior
from caffekit.errors import KitError

DEPLOY = cf.REPO / "caffe_models" / "age_net" / "deploy.prototxt"
ORIGINAL = [586, 65, 821, 342, 95, 67, 59, 57, 62]  # the Asian build's train split
OVERSAMPLED = [821] * 9


def write_manifest(path, original=ORIGINAL, oversampled=OVERSAMPLED, task="age"):
    path.write_text(json.dumps({"classes": {task: {"train": original, "train_oversampled": oversampled}}}))
    return path


def softmax_of(weights, images):
    net = cv2.dnn.readNetFromCaffe(str(DEPLOY), str(weights))
    net.setInput(images)
    return net.forward().reshape(len(images), -1)


def test_corrected_net_applies_bayes_rule_and_changes_nothing_else(tmp_path):
    weights = cf.write_random_caffemodel(DEPLOY, tmp_path / "age_net_iter_800.caffemodel", logit_std=1.0)
    out = prior.corrected_name(weights)
    assert out.name == "age_net_prior_iter_800.caffemodel"
    shift = prior.correct(weights, write_manifest(tmp_path / "manifest.json"), "age", out)["fc8"]

    expected = np.log(np.array(ORIGINAL) / max(ORIGINAL))
    np.testing.assert_allclose(shift, expected, rtol=1e-12)
    before = graph.read_weights(formats.read_caffemodel(weights))
    after = graph.read_weights(formats.read_caffemodel(out))
    for name in before:
        for i, (a, b) in enumerate(zip(before[name], after[name])):
            if (name, i) != ("fc8", 1):
                assert np.array_equal(a, b), name
    np.testing.assert_allclose(after["fc8"][1] - before["fc8"][1], expected, atol=1e-6)

    images = np.random.default_rng(1).normal(0, 40, (6, 3, 227, 227)).astype(np.float32)
    balanced, corrected = softmax_of(weights, images), softmax_of(out, images)
    bayes = balanced * np.array(ORIGINAL)  # p(y|x) ~ p_balanced(y|x) * p(y) / (1/9)
    np.testing.assert_allclose(corrected, bayes / bayes.sum(axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(corrected, balanced, atol=1e-2)


def test_an_already_natural_prior_changes_nothing(tmp_path):
    weights = cf.write_random_caffemodel(DEPLOY, tmp_path / "a_iter_1.caffemodel")
    manifest = write_manifest(tmp_path / "manifest.json", ORIGINAL, ORIGINAL)
    shift = prior.correct(weights, manifest, "age", tmp_path / "a_prior_iter_1.caffemodel")["fc8"]
    assert np.allclose(shift, 0)


def test_v1_caffemodel_is_corrected_in_its_own_syntax(tmp_path):
    weights = cf.write_random_caffemodel(DEPLOY, tmp_path / "v2_iter_1.caffemodel")
    v1 = tmp_path / "v1_iter_1.caffemodel"
    formats.write_caffemodel(v1, cf.to_v1(formats.read_caffemodel(weights)))
    prior.correct(v1, write_manifest(tmp_path / "manifest.json"), "age", tmp_path / "v1_prior_iter_1.caffemodel")
    model = formats.read_caffemodel(tmp_path / "v1_prior_iter_1.caffemodel")
    assert len(model.layers) and not len(model.layer)
    np.testing.assert_allclose(graph.read_weights(model)["fc8"][1]
                               - graph.read_weights(formats.read_caffemodel(v1))["fc8"][1],
                               np.log(np.array(ORIGINAL) / max(ORIGINAL)), atol=1e-6)


@pytest.mark.parametrize("case", ["gender manifest", "no classes", "empty class"])
def test_bad_manifest_is_a_one_line_error_and_writes_nothing(case, tmp_path):
    weights = cf.write_random_caffemodel(DEPLOY, tmp_path / "a_iter_1.caffemodel")
    manifest = tmp_path / "manifest.json"
    if case == "gender manifest":
        write_manifest(manifest, [976, 1178], [1178, 1178], task="age")
        words = ["fc8 has 9 outputs", "2 age classes"]
    elif case == "no classes":
        manifest.write_text("{}")
        words = [str(manifest), "no train class counts"]
    else:
        write_manifest(manifest, [0] + ORIGINAL[1:])
        words = ["no train face"]
    out = tmp_path / "a_prior_iter_1.caffemodel"
    with pytest.raises(KitError) as error:
        prior.correct(weights, manifest, "age", out)
    for word in words:
        assert word in str(error.value)
    assert not out.exists()


def test_joint_net_gets_each_heads_prior_and_its_fixed_layers(tmp_path):
    """The age classifier shifted by the per-year counts (years nobody in the train split had get the lowest
    shift) and then sharpened, the gender classifier left alone (the plan balanced ages, not genders: no label
    shift to undo), and age_bins / age_years written so OpenCV gives the three outputs from deploy.prototxt."""
    import torch

    from caffekit import models, torchnet

    deploy = cf.REPO / "caffe_models" / "joint_net" / "deploy.prototxt"
    net = formats.read_net(deploy)
    weights = torchnet.CaffeNet(net, graph.TEST, {"data": (1, 3, 64, 64)}, seed=1).weights()
    for name, blobs in weights.items():
        if name.endswith("_bn"):
            blobs[1][:], blobs[2][:] = 1.0, 1.0
    layers = [layer for layer in graph.net_layers(net, graph.TEST) if layer.name not in models.model("joint").fixed_layers]
    raw = tmp_path / "joint_net_iter_5.caffemodel"
    formats.write_caffemodel(raw, graph.weights_to_model("JointNet", layers, {k: v for k, v in weights.items()
                                                                            if k not in ("age_bins", "age_years")}))
    years = np.zeros(101)
    years[[1, 2, 25, 30]] = [50, 30, 100, 20]
    years_over = years.copy()
    years_over[[25, 30]] = [100, 100]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"classes": {
        "joint_age": {"train": years.tolist(), "train_oversampled": years_over.tolist()},
        "joint_gender": {"train": [300, 100], "train_oversampled": [300, 300]}}}))
    out = prior.corrected_name(raw)
    shifts = prior.correct(raw, manifest, "joint", out)
    assert set(shifts) == {"age_fc"}
    np.testing.assert_array_equal(graph.read_weights(formats.read_caffemodel(out))["gender_fc"][1],
                                  graph.read_weights(formats.read_caffemodel(raw))["gender_fc"][1])
    age = shifts["age_fc"]
    assert age[25] == pytest.approx(0) and age[30] == pytest.approx(np.log(20 / 100)) and age[0] == age.min() == age[99]
    # The years classifier is then sharpened: T * (W x + b + shift).
    raw_fc, out_fc = (graph.read_weights(formats.read_caffemodel(p))["age_fc"] for p in (raw, out))
    factor = models.model("joint").sharpen["age_fc"]
    assert factor > 1
    np.testing.assert_allclose(out_fc[0], factor * raw_fc[0], rtol=1e-6)
    np.testing.assert_allclose(out_fc[1], factor * (raw_fc[1] + age), rtol=1e-5, atol=1e-6)
    opencv = cv2.dnn.readNetFromCaffe(str(deploy), str(out))
    image = np.random.default_rng(0).normal(0, 40, (1, 3, 64, 64)).astype(np.float32)
    opencv.setInput(image)
    bins, mean_age, gender = opencv.forward(["age_bins", "age_years", "gender"])
    model = torchnet.CaffeNet(net, graph.TEST, {"data": (1, 3, 64, 64)})
    model.load_weights(graph.read_weights(formats.read_caffemodel(out)), str(out), require_all=True)
    with torch.no_grad():
        probs = model({"data": torch.from_numpy(image)})["age_prob"].numpy()
    np.testing.assert_allclose(bins, probs @ models.age_bin_matrix().T, atol=1e-5)
    np.testing.assert_allclose(mean_age, probs @ np.arange(101)[:, None], rtol=1e-4)
    assert gender.shape == (1, 2)
