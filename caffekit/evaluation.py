"""Evaluate a trained caffemodel on a test LMDB through OpenCV's Caffe importer.

OpenCV (cv2.dnn.readNetFromCaffe) is independent of the torch training code, so this checks
the written caffemodel itself. Preprocessing is Caffe's TEST transform: the mean image is
subtracted at the crop's offset. Two protocols of Levi & Hassner: the centre crop, and the
average of the softmax over 10 crops (4 corners + centre, and their mirrors).
"""
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from caffekit import atomic, formats, graph, tasks
from caffekit.errors import KitError
from caffekit.lmdb_data import LmdbSource


def crop_offsets(height: int, width: int, crop: int) -> List[tuple]:
    """(h_off, w_off, mirror) of the 10 crops: corners, centre, then the same mirrored."""
    centre = ((height - crop) // 2, (width - crop) // 2)
    corners = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop)]
    return [(h, w, False) for h, w in corners + [centre]] + [(h, w, True) for h, w in corners + [centre]]


def preprocess(image: np.ndarray, mean: np.ndarray, crop: int, h: int, w: int, mirror: bool) -> np.ndarray:
    """Caffe's TEST transform of one uint8 C x H x W image: crop, subtract the mean at the same offset,
    mirror."""
    window = (slice(None), slice(h, h + crop), slice(w, w + crop))
    out = image[window].astype(np.float32) - mean[window]
    return out[:, :, ::-1] if mirror else out


class OpenCvClassifier:
    """deploy.prototxt + caffemodel in cv2.dnn; ``probabilities(batch NCHW float32)`` -> N x classes."""

    def __init__(self, deploy, weights):
        import cv2

        for path, what in ((deploy, "deploy prototxt"), (weights, "caffemodel")):
            if not Path(path).is_file():
                raise KitError(f"{path}: {what} not found")
        model = formats.read_caffemodel(weights)  # a one-line error for truncated files, before OpenCV's
        net = formats.read_net(deploy)
        layers = graph.inference_layers(net, str(deploy))
        inputs = graph.input_shapes(net, layers)
        shapes = list(inputs.values())
        if len(shapes) != 1 or len(shapes[0]) != 4:
            raise KitError(f"{deploy}: expected one 4-D input shape, found {shapes}")
        graph.check_weights(layers, graph.blob_shapes(layers, inputs), graph.read_weights(model), str(weights))
        try:
            self.net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
        except cv2.error as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
            raise KitError(f"{weights}: OpenCV cannot load it with {deploy} ({message})") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        shape = shapes[0]
        self.crop = int(shape[2])

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.net.setInput(np.ascontiguousarray(batch, dtype=np.float32))
        return self.net.forward().reshape(len(batch), -1).astype(np.float64)

    def outputs(self, batch: np.ndarray, names) -> dict:
        """{blob name: N x size} of several output blobs in one forward pass."""
        self.net.setInput(np.ascontiguousarray(batch, dtype=np.float32))
        values = self.net.forward(list(names))
        return {name: np.asarray(value).reshape(len(batch), -1).astype(np.float64) for name, value in zip(names, values)}


@dataclass
class Predictions:
    labels: np.ndarray          # true class per test record
    centre: np.ndarray          # N x classes, centre-crop probabilities (or {output: N x size})
    ten_crop: np.ndarray        # N x classes, 10-crop mean probabilities (or {output: N x size})
    keys: List[str]


def predict(classifier: OpenCvClassifier, lmdb_path, mean_path, batch_size: int = 16,
            progress: bool = True, outputs: Optional[Sequence[str]] = None) -> Predictions:
    """Centre-crop and 10-crop outputs of every test record: the net's one output, or with ``outputs``
    a dict {blob: N x size} of those blobs (a joint net's heads), all from the same forward passes."""
    source = LmdbSource(lmdb_path)
    mean = formats.read_mean(mean_path)
    if tuple(mean.shape) != tuple(source.shape):
        raise KitError(f"{mean_path}: mean image has shape {tuple(mean.shape)}, the LMDB images are "
                       f"{tuple(source.shape)}")
    _, height, width = source.shape
    crop = classifier.crop
    if crop > min(height, width):
        raise KitError(f"{lmdb_path}: images are {height}x{width}, smaller than the {crop} input")
    offsets = crop_offsets(height, width, crop)
    count = len(source)
    labels = np.empty(count, np.int64)
    centre, ten = {}, {}
    names = list(outputs) if outputs else [None]
    iterator = range(0, count, batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="evaluate", unit="batch")
    for start in iterator:
        images = []
        for i in range(start, min(start + batch_size, count)):
            image, label = source.image_label(i)
            images.append(image)
            labels[i] = label
        # One forward of len(images) * 10 crops; crop 4 (index) is the plain centre crop.
        batch = np.stack([preprocess(image, mean, crop, h, w, m) for image in images for h, w, m in offsets])
        values = classifier.outputs(batch, names) if outputs else {None: classifier.probabilities(batch)}
        for name, value in values.items():
            value = value.reshape(len(images), len(offsets), -1)
            centre.setdefault(name, []).append(value[:, 4])
            ten.setdefault(name, []).append(value.mean(axis=1))
    keys = [k.decode(errors="replace") for k in source.keys]
    source.close()
    centre = {name: np.concatenate(parts) for name, parts in centre.items()}
    ten = {name: np.concatenate(parts) for name, parts in ten.items()}
    if not outputs:
        return Predictions(labels, centre[None], ten[None], keys)
    return Predictions(labels, centre, ten, keys)


# ---------------------------------------------------------------- metrics
def confusion_matrix(labels: Sequence[int], predicted: Sequence[int], classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
            true_ages: Optional[np.ndarray] = None, bin_centres: Optional[Sequence[float]] = None) -> Dict:
    """Accuracy, per-class recall and the confusion matrix; for age also 1-off accuracy (a prediction in
    an adjacent bin counts) and the MAE of the expected age (sum of p_i * centre_i) against the true age."""
    labels = np.asarray(labels)
    predicted = probs.argmax(axis=1)
    classes = len(class_names)
    matrix = confusion_matrix(labels, predicted, classes)
    recall = {name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
              for i, name in enumerate(class_names)}
    result = {"count": int(len(labels)), "correct": int((predicted == labels).sum()),
              "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
              "per_class_recall": recall, "confusion_matrix": matrix.tolist()}
    if bin_centres is not None:
        one_off = np.abs(predicted - labels) <= 1
        result["one_off_correct"] = int(one_off.sum())
        result["one_off_accuracy"] = float(one_off.mean()) if len(labels) else 0.0
        if true_ages is not None:
            expected = probs @ np.asarray(bin_centres, np.float64)
            known = ~np.isnan(true_ages)
            if known.any():
                result["mae_years"] = float(np.abs(expected[known] - true_ages[known]).mean())
                result["mae_count"] = int(known.sum())
    return result


def accuracy_by_age(labels: np.ndarray, probs: np.ndarray, true_ages: np.ndarray) -> Dict[str, Dict]:
    """Accuracy within each decade of true age (the age bins), for faces whose age is known: where a
    gender net fails (UTKFace's many babies) says more than one overall rate."""
    predicted = np.asarray(probs).argmax(axis=1)
    correct = predicted == np.asarray(labels)
    known = ~np.isnan(true_ages)
    bins = np.full(len(true_ages), -1)
    bins[known] = [tasks.age_to_bin(int(a)) for a in true_ages[known]]
    result = {}
    for index, name in enumerate(tasks.AGE_LABELS):
        members = bins == index
        if members.any():
            result[name] = {"count": int(members.sum()), "correct": int(correct[members].sum()),
                            "accuracy": float(correct[members].mean())}
    return result


def format_confusion(matrix, class_names: Sequence[str]) -> str:
    """The reference project's layout: rows are the true class, columns the predicted class."""
    matrix = np.asarray(matrix)
    width = max(6, max(len(n) for n in class_names) + 1, len(str(matrix.max())) + 1)
    head = "true \\ pred".ljust(width + 5)
    lines = [head + "".join(n.rjust(width) for n in class_names) + "total".rjust(width)]
    for name, row in zip(class_names, matrix):
        lines.append(name.ljust(width + 5) + "".join(str(v).rjust(width) for v in row) + str(row.sum()).rjust(width))
    lines.append("total".ljust(width + 5) + "".join(str(v).rjust(width) for v in matrix.sum(0))
                 + str(matrix.sum()).rjust(width))
    return "\n".join(lines)


def plot_confusion(matrix, class_names: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    size = 1.2 + 0.6 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def joint_metrics(outputs: Dict[str, np.ndarray], true_ages: np.ndarray, genders: np.ndarray) -> Dict:
    """The joint net's figures: age bins (exact, 1-off, per bin) from ``age_bins``, the MAE of ``age_years``
    in years, gender overall and within each decade of true age."""
    bins = np.array([tasks.age_to_bin(int(age)) for age in true_ages])
    age = metrics(bins, outputs["age_bins"], tasks.AGE_LABELS, None, tasks.AGE_BIN_CENTRES)
    years = outputs["age_years"].reshape(-1)
    age["mae_years"] = float(np.abs(years - true_ages).mean())
    age["mae_count"] = int(len(true_ages))
    age["mae_of"] = "age_years (the expected age over one class a year)"
    gender = metrics(genders, outputs["gender"], tasks.GENDER_LABELS)
    gender["accuracy_by_age"] = accuracy_by_age(genders, outputs["gender"], true_ages)
    return {"age": age, "gender": gender}


def read_test_csv(csv_path: Path, keys: Sequence[str], column: str) -> np.ndarray:
    """One numeric column of <net>_test.csv in LMDB order."""
    values = {}
    try:
        with csv_path.open(newline="") as f:
            for row in csv.DictReader(f):
                values[row["key"]] = float(row[column])
    except (OSError, KeyError, ValueError) as exc:
        raise KitError(f"{csv_path}: cannot read column {column!r} ({exc.__class__.__name__}: {exc})") from None
    missing = [key for key in keys if key not in values]
    if missing:
        raise KitError(f"{csv_path}: no row for LMDB record {missing[0]!r}")
    return np.array([values[key] for key in keys])


def read_true_ages(csv_path: Path, keys: Sequence[str]) -> Optional[np.ndarray]:
    """True ages in LMDB order from <task>_test.csv (columns key, file, age, ...); None when absent."""
    if not csv_path.is_file():
        return None
    ages = {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "key" not in reader.fieldnames or "age" not in reader.fieldnames:
            raise KitError(f"{csv_path}: expected columns key and age, found {reader.fieldnames}")
        for row in reader:
            try:
                ages[row["key"]] = float(row["age"])
            except ValueError:
                raise KitError(f"{csv_path}: age {row['age']!r} of key {row['key']!r} is not a number") from None
    return np.array([ages.get(k, np.nan) for k in keys], np.float64)


def write_report(path: Path, report: Dict) -> None:
    atomic.write_text(path, json.dumps(report, indent=2) + "\n")
