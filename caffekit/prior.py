"""Give a net trained on the oversampled (class-balanced) train LMDB back the train split's class prior.

`make dataset` tops every class up to the largest, so the net learns as if every age bin were equally
common. On faces drawn like the train split (the test split, and the faces a user meets) that makes it
pick the rare decades far too often: AgeNet predicts 10-19 for 56 test faces of which 16 are 10-19.
Bayes' rule says what to do about it: p_real(y|x) is proportional to p_balanced(y|x) * p_real(y) / p_balanced(y).
Adding log(p_real(y) / p_balanced(y)) to the bias of the last InnerProduct layer does exactly that inside
the softmax, so every engine (Caffe, OpenCV, OpenVINO on the stick) gets the corrected decision without
extra code. Both priors come from the dataset manifest: the train split's originals and the oversampled
counts; nothing is fitted, and nothing comes from the test split.
"""
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from caffekit import formats, models
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2
from caffekit.snapshots import parse_snapshot_name, snapshot_name


def class_counts(manifest_path, task: str):
    """(original, oversampled) train counts per class of ``task`` from a dataset manifest.json."""
    try:
        classes = json.loads(Path(manifest_path).read_text())["classes"][task]
        return np.asarray(classes["train"], float), np.asarray(classes["train_oversampled"], float)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KitError(f"{manifest_path}: no train class counts for {task} ({exc.__class__.__name__})") from None


def log_prior_ratio(original: Sequence[float], oversampled: Sequence[float], allow_empty: bool = False) -> np.ndarray:
    """log(p_real / p_balanced) per class, shifted so the largest class gets 0 (a softmax ignores the shift).

    ``allow_empty``: classes with no train face (a year nobody in the set had) get the lowest shift of
    the others, so the correction never makes an unseen class likelier."""
    original, oversampled = np.asarray(original, float), np.asarray(oversampled, float)
    empty = (original <= 0) | (oversampled <= 0)
    if np.any(empty) and (not allow_empty or np.all(empty)):
        raise KitError("a class with no train face has no prior to restore")
    ratio = np.zeros_like(original)
    seen = ~empty
    ratio[seen] = np.log(original[seen] / original[seen].sum()) - np.log(oversampled[seen] / oversampled[seen].sum())
    ratio[empty] = ratio[seen].min() if np.any(empty) else 0.0
    return ratio - ratio.max()


def stored_layers(model: caffe_pb2.NetParameter):
    return model.layer if len(model.layer) else model.layers


def classifier_layer(model: caffe_pb2.NetParameter, source: str, name: Optional[str] = None):
    """The InnerProduct layer ``name`` with a bias (default: the last one, which the softmax reads), as
    stored: V2 or V1 entry. Old Levi & Hassner caffemodels call theirs fc8 too, or otherwise."""
    inner_product = ("InnerProduct", caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    candidates = [layer for layer in stored_layers(model) if layer.type in inner_product and len(layer.blobs) == 2]
    if name is not None and any(layer.name == name for layer in candidates):
        return next(layer for layer in candidates if layer.name == name)
    if not candidates or (name is not None and len({layer.name for layer in candidates}) > 1):
        raise KitError(f"{source}: no InnerProduct layer {name or ''} with a bias to correct".replace("  ", " "))
    return candidates[-1]


def correct(weights_path, manifest_path, net: str, out_path) -> Dict[str, np.ndarray]:
    """Write ``out_path``: the caffemodel with each head's prior shift added to its classifier's bias (then
    finished: sharpened classifiers, the net's fixed layers); returns {layer: shift}."""
    entry = models.model(net)
    model = formats.read_caffemodel(weights_path)
    shifts = {}
    for head_prior in entry.priors:
        layer = classifier_layer(model, str(weights_path), head_prior.layer)
        bias = formats.blob_to_array(layer.blobs[1])
        counts = class_counts(manifest_path, head_prior.classes)
        shift = log_prior_ratio(*counts, allow_empty=head_prior.unseen_classes)
        if bias.size != shift.size:
            raise KitError(f"{weights_path}: {layer.name} has {bias.size} outputs, {manifest_path} has "
                           f"{shift.size} {head_prior.classes} classes")
        set_values(layer.blobs[1], bias.astype(np.float64).ravel() + shift)
        shifts[layer.name] = shift
    finish_layers(model, entry, str(weights_path))
    formats.write_caffemodel(out_path, model)
    return shifts


def finish_layers(model: caffe_pb2.NetParameter, entry: "models.Model", source: str) -> None:
    """What every finished caffemodel of ``entry`` gets, prior correction or not: its sharpened classifiers and
    its fixed layers."""
    for name, factor in entry.sharpen.items():
        for blob in classifier_layer(model, source, name).blobs:
            set_values(blob, formats.blob_to_array(blob).astype(np.float64).ravel() * factor)
    add_fixed_layers(model, entry)


def set_values(blob: caffe_pb2.BlobProto, values: np.ndarray) -> None:
    """Overwrite a stored blob's values in place: it keeps its shape fields, whichever Caffe wrote."""
    stored = blob.double_data if len(blob.double_data) else blob.data
    stored[:] = np.asarray(values, np.float32).tolist()


def add_fixed_layers(model: caffe_pb2.NetParameter, entry: "models.Model") -> None:
    """Write the net's fixed-weight layers (sums over a softmax, e.g. age_bins) into a caffemodel, so every
    engine that loads deploy.prototxt with it gets those outputs without code of its own."""
    for name, make_blobs in entry.fixed_layers.items():
        for existing in [layer for layer in stored_layers(model) if layer.name == name]:
            stored_layers(model).remove(existing)
        layer = model.layer.add(name=name, type="InnerProduct")
        layer.blobs.extend(formats.array_to_blob(array) for array in make_blobs())


def finished_copy(weights_path, out_path, net: str) -> None:
    """The finished caffemodel without prior correction (for --no-prior): sharpened, with the fixed layers."""
    model = formats.read_caffemodel(weights_path)
    finish_layers(model, models.model(net), str(weights_path))
    formats.write_caffemodel(out_path, model)


def corrected_name(snapshot: Path, kind: str = "prior") -> Path:
    """age_net_iter_800.caffemodel -> age_net_prior_iter_800.caffemodel (still a *_iter_N snapshot name, so
    evaluation and compilation take it as the newest)."""
    parsed = parse_snapshot_name(snapshot)
    if parsed is None:
        raise KitError(f"{snapshot}: not a snapshot name (<prefix>_iter_<N>.caffemodel)")
    prefix, iteration = parsed
    return snapshot_name(prefix, iteration, kind)
