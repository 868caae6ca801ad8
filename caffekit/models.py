"""The registry of model families: each net, its heads, and the facts every stage reads about them.

Training, evaluation, compiling and the benchmark look nets up here; the IR's JSON carries the heads
to the device, so ``edge/`` never imports this module. A head is one named output of the deploy net.
"""
import json
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from caffekit import formats
from caffekit.errors import KitError
from caffekit.tasks import AGE_LABELS, AGE_SCHEMES, GENDER_LABELS, age_scheme, age_to_bin

# The joint net's age head: one class per year 0..AGE_YEARS_MAX (older faces count as AGE_YEARS_MAX).
AGE_YEARS_MAX = 100
AGE_YEAR_CLASSES = AGE_YEARS_MAX + 1
# Label-distribution learning: each face's age becomes a Gaussian over the neighbouring years.
AGE_SIGMA_YEARS = 2.0
AGE_SHARPEN = 2.0  # the joint net's years logits are multiplied by this in the finished caffemodel (Model.sharpen)


class Head(NamedTuple):
    output: str                  # blob name in deploy.prototxt = output name of the IR
    task: str                    # age (decade bins) | age_years (expected age) | gender
    labels: Optional[Tuple[str, ...]] = None  # class names; None for a value head


class Prior(NamedTuple):
    """A classifier whose bias the prior correction shifts, and the manifest class counts it uses. Only a
    head whose own classes the oversampling balanced gets one: Bayes' rule undoes a change of the label
    prior, and oversampling by age bin is no such change for gender (a face's copies keep its gender)."""
    layer: str
    classes: str                 # key in the dataset manifest's "classes"
    unseen_classes: bool = False  # one class a year: some years have no train face (they get the lowest shift)


class Model(NamedTuple):
    key: str                     # --net / make target name: age, gender, joint
    name: str                    # folder and file prefix: age_net ...
    heads: Tuple[Head, ...]
    data: str                    # LMDB family in DATA_DIR: lmdb/<data>_{train,test}_lmdb, <data>_test.csv
    priors: Tuple[Prior, ...]
    mean_file: str = "mean.binaryproto"
    # Layers whose weights are facts, not learned: {layer: function() -> blobs}, written by the kit.
    fixed_layers: Dict[str, Callable[[], List[np.ndarray]]] = {}
    # Classifiers whose logits the finished caffemodel multiplies by T, {layer: T}: softmax(T * z), a sharper
    # posterior, in every engine (the weights and bias are scaled; no layer is added).
    sharpen: Dict[str, float] = {}

    def head(self, task: str) -> Optional[Head]:
        return next((head for head in self.heads if head.task == task), None)

    @property
    def tasks(self) -> Tuple[str, ...]:
        return tuple(head.task for head in self.heads)


def age_bin_matrix() -> np.ndarray:
    """9 x 101: row b sums the probabilities of the years in decade bin b."""
    matrix = np.zeros((len(AGE_LABELS), AGE_YEAR_CLASSES), np.float32)
    for year in range(AGE_YEAR_CLASSES):
        matrix[age_to_bin(year), year] = 1.0
    return matrix


def age_year_values() -> np.ndarray:
    """1 x 101: the expected age is the probabilities times the years."""
    return np.arange(AGE_YEAR_CLASSES, dtype=np.float32)[np.newaxis]


def infogain_matrix(sigma: float = AGE_SIGMA_YEARS) -> np.ndarray:
    """H for InfogainLoss: row k is a normalised Gaussian around year k, the soft label of age k."""
    years = np.arange(AGE_YEAR_CLASSES, dtype=np.float64)
    rows = np.exp(-0.5 * ((years[np.newaxis] - years[:, np.newaxis]) / sigma) ** 2)
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


def infogain_file(sigma: float = AGE_SIGMA_YEARS) -> bytes:
    """joint_infogain.binaryproto as `make dataset` writes it: the matrix as a 1 x 1 x 101 x 101 BlobProto."""
    return formats.array_to_blob(infogain_matrix(sigma)[np.newaxis, np.newaxis]).SerializeToString()


def age_year_label(age: int) -> int:
    return min(int(age), AGE_YEARS_MAX)


MODELS: Dict[str, Model] = {
    "age": Model("age", "age_net", (Head("prob", "age", tuple(AGE_LABELS)),), "age", (Prior("fc8", "age"),)),
    "gender": Model("gender", "gender_net", (Head("prob", "gender", tuple(GENDER_LABELS)),), "gender",
                    (Prior("fc8", "gender"),)),
    "joint": Model("joint", "joint_net",
                   (Head("age_bins", "age", tuple(AGE_LABELS)), Head("age_years", "age_years"),
                    Head("gender", "gender", tuple(GENDER_LABELS))),
                   "joint", (Prior("age_fc", "joint_age", unseen_classes=True),),
                   mean_file="joint_mean.binaryproto",
                   fixed_layers={"age_bins": lambda: [age_bin_matrix()],
                                 "age_years": lambda: [age_year_values()]},
                   # Trained against 2-year label distributions, the years posterior keeps a long tail that pulls
                   # the expected age up (+1.7 years on the under-tens); T = 2, chosen on the validation split,
                   # took the MAE from 3.93 to 3.63 years and left the bins' accuracy within a face (docs/experiments.md).
                   sharpen={"age_fc": AGE_SHARPEN}),
}
DETECTOR_FOLDER = "face_detector"  # models/ir/<this>/: the face detector scripts/build_detector.py writes beside the nets

PAIR = ("age", "gender")  # the Levi & Hassner nets, one task each


# The age labels of each dataset source (dataset/build.py --source), by name in caffekit.tasks.AGE_SCHEMES. The
# dataset manifest records the labels it was built with ("classes" -> "age" -> "labels"); a net's learned age
# classifier follows them (fit_net): AgeNet's fc8 has 9 outputs on UTKFace and IMDB-WIKI, 8 on Adience. The joint
# net's age_bins head is not learned (decade bins summed from its years head), so it keeps the decades everywhere.
SOURCE_AGE_SCHEMES = {"utkface": "decades", "imdb-wiki": "decades", "adience": "adience"}


def source_age_labels(source: str) -> Tuple[str, ...]:
    try:
        return tuple(AGE_SCHEMES[SOURCE_AGE_SCHEMES[source]]["labels"])
    except KeyError:
        raise KitError(f"unknown dataset source {source!r} (expected one of {', '.join(SOURCE_AGE_SCHEMES)})") from None


def dataset_age_labels(data_dir) -> Tuple[str, ...]:
    """The age labels of the dataset in ``data_dir`` (its manifest.json); the decades where there is no manifest
    (LMDBs the user made another way)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return tuple(AGE_LABELS)
    try:
        classes = json.loads(path.read_text()).get("classes", {})
        if "labels" not in classes.get("age", {}):  # a manifest that names no age labels: the kit's decades
            return tuple(AGE_LABELS)
        labels = tuple(classes["age"]["labels"])
        age_scheme(labels)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KitError(f"{path}: no known age labels in classes.age.labels ({exc.__class__.__name__})") from None
    return labels


def with_age_labels(key: str, labels: Sequence[str]) -> Model:
    """The net ``key`` with its learned age head relabelled to ``labels`` (the registry's entry when they are
    the decades, or when the net has no learned age head)."""
    entry = model(key)
    learned = {prior.classes for prior in entry.priors}
    heads = tuple(head._replace(labels=tuple(labels)) if head.task == "age" and head.task in learned else head
                  for head in entry.heads)
    return entry._replace(heads=heads)


def for_dataset(key: str, data_dir) -> Model:
    """The net ``key`` as the dataset in ``data_dir`` labels it: what training, evaluation and compiling read."""
    return with_age_labels(key, dataset_age_labels(data_dir))


def fit_net(net, entry: Model):
    """A copy of the NetParameter ``net`` whose learned classifiers have as many outputs as ``entry``'s heads have
    labels (fc8's num_output: 9 in the shipped prototxts, 8 for Adience). Training reads it for train_val and
    deploy, so the caffemodel, its deploy.prototxt and the IR follow the dataset."""
    fitted = type(net)()
    fitted.CopyFrom(net)
    sizes = {prior.layer: len(entry.head(prior.classes).labels) for prior in entry.priors
             if entry.head(prior.classes) is not None and entry.head(prior.classes).labels is not None}
    for layer in list(fitted.layer) + list(fitted.layers):
        if layer.name in sizes and layer.HasField("inner_product_param"):
            layer.inner_product_param.num_output = sizes[layer.name]
    return fitted


def model(key: str) -> Model:
    try:
        return MODELS[key]
    except KeyError:
        raise KitError(f"unknown net {key!r} (expected one of {', '.join(MODELS)})") from None


def by_name(name: str) -> Model:
    """The model whose folder/prefix is ``name`` (age_net ...)."""
    for entry in MODELS.values():
        if entry.name == name:
            return entry
    raise KitError(f"unknown net {name!r} (expected one of {', '.join(m.name for m in MODELS.values())})")


def head_metadata(head: Head) -> dict:
    """A head as the IR's JSON lists it (what the edge runner reads)."""
    meta = {"name": head.output, "task": head.task}
    if head.labels is not None:
        meta["labels"] = list(head.labels)
    if head.task == "age":
        scheme = age_scheme(head.labels)
        meta["age_bin_edges"] = list(scheme["edges"])
        meta["age_bin_centres"] = list(scheme["centres"])
    if head.task == "age_years":
        meta["unit"] = "years"
    return meta
