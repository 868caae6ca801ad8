"""caffekit.soup: the element-wise mean of caffemodels of one net, loaded back through OpenCV's Caffe
importer (an engine independent of the averaging)."""
import cv2
import numpy as np
import pytest

import caffe_fixtures as cf
from caffekit import formats, graph, soup
from caffekit.errors import KitError

GENDER_DEPLOY = cf.REPO / "caffe_models" / "gender_net" / "deploy.prototxt"
AGE_DEPLOY = cf.REPO / "caffe_models" / "age_net" / "deploy.prototxt"


def weights_of(path):
    return graph.read_weights(formats.read_caffemodel(path))


def test_soup_is_the_mean_of_every_blob_and_opencv_runs_it(tmp_path):
    ingredients = [cf.write_random_caffemodel(GENDER_DEPLOY, tmp_path / f"g{seed}_iter_1.caffemodel", seed=seed)
                   for seed in range(3)]
    out = tmp_path / "soup_iter_1.caffemodel"
    assert soup.average(ingredients, out) == 3

    averaged, each = weights_of(out), [weights_of(path) for path in ingredients]
    assert averaged.keys() == each[0].keys()
    for name, blobs in averaged.items():
        for i, blob in enumerate(blobs):
            expected = np.mean([np.asarray(w[name][i], np.float64) for w in each], axis=0)
            np.testing.assert_allclose(blob, expected, rtol=1e-6, atol=1e-7, err_msg=name)
    assert not np.allclose(averaged["conv1"][0], each[0]["conv1"][0])

    net = cv2.dnn.readNetFromCaffe(str(GENDER_DEPLOY), str(out))
    net.setInput(np.random.default_rng(0).normal(0, 40, (2, 3, 227, 227)).astype(np.float32))
    probabilities = net.forward().reshape(2, -1)
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_v1_caffemodel_soup_keeps_its_syntax(tmp_path):
    ingredients = []
    for seed in range(2):
        v2 = cf.write_random_caffemodel(GENDER_DEPLOY, tmp_path / f"v2_{seed}.caffemodel", seed=seed)
        ingredients.append(tmp_path / f"v1_{seed}.caffemodel")
        formats.write_caffemodel(ingredients[-1], cf.to_v1(formats.read_caffemodel(v2)))
    soup.average(ingredients, tmp_path / "soup.caffemodel")
    model = formats.read_caffemodel(tmp_path / "soup.caffemodel")
    assert len(model.layers) and not len(model.layer)
    np.testing.assert_allclose(graph.read_weights(model)["fc8"][1],
                               (weights_of(ingredients[0])["fc8"][1] + weights_of(ingredients[1])["fc8"][1]) / 2,
                               rtol=1e-6)


@pytest.mark.parametrize("case", ["other net", "one ingredient", "truncated"])
def test_bad_ingredients_are_a_one_line_error_and_write_nothing(case, tmp_path):
    gender = cf.write_random_caffemodel(GENDER_DEPLOY, tmp_path / "gender.caffemodel")
    if case == "other net":
        other = cf.write_random_caffemodel(AGE_DEPLOY, tmp_path / "age.caffemodel")
        ingredients, words = [gender, other], [str(other), "does not match gender.caffemodel", "fc8"]
    elif case == "one ingredient":
        ingredients, words = [gender], [str(gender), "at least two"]
    else:
        truncated = tmp_path / "truncated.caffemodel"
        truncated.write_bytes(gender.read_bytes()[:1000])
        ingredients, words = [gender, truncated], [str(truncated), "not a valid caffemodel"]
    out = tmp_path / "soup.caffemodel"
    with pytest.raises(KitError) as error:
        soup.average(ingredients, out)
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)
    assert not out.exists()
