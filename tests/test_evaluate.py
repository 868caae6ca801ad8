"""Evaluation through OpenCV: metrics arithmetic on a hand-made example, and scripts/evaluate.py
end to end on a small LMDB with a freshly initialised AgeNet."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from caffekit import evaluation, formats, tasks, training
from caffekit.backends.torch import TorchBackend
from caffekit.proto import caffe_pb2
from train_fixtures import REPO, make_dataset, small_solver

UTKFACE = REPO.parent / "shared" / "data" / "utkface"


def test_one_off_and_mae_arithmetic():
    names = ["a", "b", "c", "d"]
    centres = [5.0, 15.0, 25.0, 35.0]
    labels = np.array([0, 1, 2, 3, 3])
    probs = np.array([
        [1.0, 0.0, 0.0, 0.0],   # exact (0); expected age 5, true 7 -> |5-7| = 2
        [0.0, 0.0, 1.0, 0.0],   # 1 off (2 for 1); expected 25, true 12 -> 13
        [0.5, 0.0, 0.0, 0.5],   # argmax 0 (first max), 2 off; expected 20, true 28 -> 8
        [0.0, 0.0, 0.2, 0.8],   # exact (3); expected 33, true 36 -> 3
        [0.0, 0.6, 0.4, 0.0],   # 2 off; expected 19, true age unknown -> not in the MAE
    ])
    ages = np.array([7, 12, 28, 36, np.nan])
    result = evaluation.metrics(labels, probs, names, ages, centres)
    assert result["correct"] == 2 and result["accuracy"] == pytest.approx(0.4)
    assert result["one_off_correct"] == 3 and result["one_off_accuracy"] == pytest.approx(0.6)
    assert result["mae_years"] == pytest.approx((2 + 13 + 8 + 3) / 4) and result["mae_count"] == 4
    assert result["per_class_recall"] == {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.5}
    assert result["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 1]]
    text = evaluation.format_confusion(result["confusion_matrix"], names)
    lines = text.splitlines()
    assert lines[0].split() == ["true", "\\", "pred", "a", "b", "c", "d", "total"]
    assert lines[3].split() == ["c", "1", "0", "0", "0", "1"]  # row = true class c, predicted a


def test_accuracy_by_age_groups_faces_by_decade_of_true_age():
    labels = np.array([0, 1, 1, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4], [0.5, 0.5]])
    ages = np.array([1, 2, 25, 29, 85, np.nan])  # right, wrong | right, wrong | right | unknown: left out
    result = evaluation.accuracy_by_age(labels, probs, ages)
    assert result == {"0-9": {"count": 2, "correct": 1, "accuracy": 0.5},
                      "20-29": {"count": 2, "correct": 1, "accuracy": 0.5},
                      "80+": {"count": 1, "correct": 1, "accuracy": 1.0}}


def test_ten_crops_are_corners_centre_and_mirrors():
    offsets = evaluation.crop_offsets(256, 256, 227)
    assert offsets[:5] == [(0, 0, False), (0, 29, False), (29, 0, False), (29, 29, False), (14, 14, False)]
    assert offsets[5:] == [(h, w, True) for h, w, _ in offsets[:5]]
    image = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    mean = np.ones((2, 4, 4), np.float32)
    out = evaluation.preprocess(image, mean, 2, 1, 2, True)
    np.testing.assert_array_equal(out, (image[:, 1:3, 2:4].astype(np.float32) - 1)[:, :, ::-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small test LMDB and an AgeNet snapshot straight from the fillers (max_iter 0)."""
    work = tmp_path_factory.mktemp("eval")
    data = make_dataset(work / "data", UTKFACE if UTKFACE.is_dir() else None, train=20, test=12, size=256)
    for net in ("age_net", "gender_net"):
        solver = small_solver(work / f"{net}_solver.prototxt", net=f"caffe_models/{net}/train_val.prototxt",
                              max_iter=0, snapshot_prefix=f'"{net}"')
        config = training.RunConfig(net=net, solver=str(solver), data_dir=str(data),
                                    models_dir=str(work / "models"), precision="fp32")
        TorchBackend(progress=False).train(config)
    return {"data": data, "models": work / "models"}


def run_evaluate(model, task: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts/evaluate.py"), "--net", task, "--data-dir",
                           str(model["data"]), "--models-dir", str(model["models"]), "--batch", "4",
                           "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_evaluate_cli_writes_report_and_confusion(model):
    proc = run_evaluate(model, "age")
    out = model["models"] / "age_net" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["weights"].endswith("age_net_iter_0.caffemodel")  # the newest snapshot by default
    for protocol in ("centre", "10crop"):
        result = report["protocols"][protocol]
        assert result["count"] == 12
        assert 0 <= result["accuracy"] <= result["one_off_accuracy"] <= 1
        assert result["mae_count"] == 12 and result["mae_years"] > 0
        assert np.array(result["confusion_matrix"]).sum() == 12
        assert (out / f"confusion_{protocol}.png").stat().st_size > 1000
    assert "rows: true, columns: predicted" in proc.stdout
    assert "true \\ pred" in proc.stdout and "80+" in proc.stdout
    # The centre-crop probabilities equal a direct OpenCV forward of Caffe's TEST transform (the centre 227
    # crop of each Datum minus the same crop of the mean), and the report's centre scores are theirs.
    images, labels = read_datums(model["data"] / "lmdb/age_test_lmdb")
    assert labels.tolist() == [tasks.age_to_bin(int(a)) for a in
                               np.genfromtxt(model["data"] / "age_test.csv", delimiter=",", names=True)["age"]]
    offset = (256 - 227) // 2
    crops = (images - formats.read_mean(model["data"] / "mean.binaryproto"))[:, :, offset:offset + 227,
                                                                             offset:offset + 227]
    net = cv2.dnn.readNetFromCaffe(str(REPO / "caffe_models/age_net/deploy.prototxt"), report["weights"])
    net.setInput(np.ascontiguousarray(crops))
    direct = net.forward().reshape(len(images), -1)
    assert direct.std(axis=0).max() > 1e-4  # the images give different answers, so a wrong crop would show
    classifier = evaluation.OpenCvClassifier(REPO / "caffe_models/age_net/deploy.prototxt", report["weights"])
    preds = evaluation.predict(classifier, model["data"] / "lmdb/age_test_lmdb",
                               model["data"] / "mean.binaryproto", batch_size=5, progress=False)
    np.testing.assert_allclose(preds.centre, direct, atol=1e-6)
    np.testing.assert_array_equal(preds.labels, labels)
    centre = report["protocols"]["centre"]
    assert centre["correct"] == int((direct.argmax(1) == labels).sum())
    assert centre["confusion_matrix"] == evaluation.confusion_matrix(labels, direct.argmax(1), 9).tolist()
    ages = np.genfromtxt(model["data"] / "age_test.csv", delimiter=",", names=True)["age"]
    assert centre["mae_years"] == pytest.approx(np.abs(direct @ np.array(tasks.AGE_BIN_CENTRES) - ages).mean())


def read_datums(path):
    """The raw Datums of an LMDB in key order, read with lmdb and protobuf alone: (N x C x H x W float32, labels)."""
    import lmdb

    images, labels = [], []
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        for _, value in txn.cursor():
            datum = caffe_pb2.Datum.FromString(value)
            images.append(np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width))
            labels.append(datum.label)
    return np.stack(images).astype(np.float32), np.array(labels)


@pytest.mark.slow
def test_evaluate_gender_reports_accuracy_by_true_age(model):
    proc = run_evaluate(model, "gender")
    report = json.loads((model["models"] / "gender_net" / "eval" / "report.json").read_text())
    ages = np.genfromtxt(model["data"] / "gender_test.csv", delimiter=",", names=True)["age"]
    expected_counts = {}
    for age in ages:
        name = tasks.AGE_LABELS[tasks.age_to_bin(int(age))]
        expected_counts[name] = expected_counts.get(name, 0) + 1
    for protocol in ("centre", "10crop"):
        result = report["protocols"][protocol]
        by_age = result["accuracy_by_age"]
        assert {k: v["count"] for k, v in by_age.items()} == expected_counts
        assert sum(v["correct"] for v in by_age.values()) == result["correct"]
        assert "mae_years" not in result and "one_off_accuracy" not in result
    assert proc.stdout.count("accuracy by true age: ") == 2


def test_evaluate_cli_errors(model, tmp_path):
    broken = tmp_path / "cut.caffemodel"
    good = next((model["models"] / "age_net").glob("*.caffemodel"))
    broken.write_bytes(good.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, str(REPO / "scripts/evaluate.py"), "--net", "age", "--data-dir",
                           str(model["data"]), "--models-dir", str(model["models"]), "--weights", str(broken)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {broken}: not a valid caffemodel "
                                                "(truncated or not a Caffe NetParameter)"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts/evaluate.py"), "--net", "gender", "--data-dir",
                           str(model["data"]), "--models-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "no *_iter_N.caffemodel snapshot" in proc.stderr


def test_evaluate_refuses_weights_of_another_definition(model, tmp_path):
    """A caffemodel holding weights for a layer the deploy net lacks (as JointNet's four-block models under the
    three-block deploy net, whose shared layers' shapes match) is one error line, not a silent evaluation."""
    good = next((model["models"] / "age_net").glob("*.caffemodel"))
    caffemodel = formats.read_caffemodel(good)
    extra = caffemodel.layer.add()
    extra.CopyFrom(next(layer for layer in caffemodel.layer if layer.blobs))
    extra.name = "res1_a"
    other = tmp_path / "other_definition.caffemodel"
    formats.write_caffemodel(other, caffemodel)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/evaluate.py"), "--net", "age", "--data-dir",
                           str(model["data"]), "--models-dir", str(model["models"]), "--weights", str(other)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {other}: has weights for layers the prototxt does not define ('res1_a'): trained from another "
        "network definition? Give its deploy prototxt"]
