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
from typing import Sequence

import numpy as np

from caffekit import formats
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2


def class_counts(manifest_path, task: str):
    """(original, oversampled) train counts per class of ``task`` from a dataset manifest.json."""
    try:
        classes = json.loads(Path(manifest_path).read_text())["classes"][task]
        return np.asarray(classes["train"], float), np.asarray(classes["train_oversampled"], float)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KitError(f"{manifest_path}: no train class counts for {task} ({exc.__class__.__name__})") from None


def log_prior_ratio(original: Sequence[float], oversampled: Sequence[float]) -> np.ndarray:
    """log(p_real / p_balanced) per class, shifted so the largest class gets 0 (a softmax ignores the shift)."""
    original, oversampled = np.asarray(original, float), np.asarray(oversampled, float)
    if np.any(original <= 0) or np.any(oversampled <= 0):
        raise KitError("a class with no train face has no prior to restore")
    ratio = np.log(original / original.sum()) - np.log(oversampled / oversampled.sum())
    return ratio - ratio.max()


def classifier_layer(model: caffe_pb2.NetParameter, source: str):
    """The last InnerProduct layer with a bias (the one the softmax reads), as stored: V2 or V1 entry."""
    stored = model.layer if len(model.layer) else model.layers
    inner_product = ("InnerProduct", caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    candidates = [layer for layer in stored if layer.type in inner_product and len(layer.blobs) == 2]
    if not candidates:
        raise KitError(f"{source}: no InnerProduct layer with a bias to correct")
    return candidates[-1]


def correct(weights_path, manifest_path, task: str, out_path) -> np.ndarray:
    """Write ``out_path``: the caffemodel with the prior shift added to its classifier's bias; returns the shift."""
    model = formats.read_caffemodel(weights_path)
    layer = classifier_layer(model, str(weights_path))
    bias = formats.blob_to_array(layer.blobs[1])
    shift = log_prior_ratio(*class_counts(manifest_path, task))
    if bias.size != shift.size:
        raise KitError(f"{weights_path}: {layer.name} has {bias.size} outputs, {manifest_path} has "
                       f"{shift.size} {task} classes")
    corrected = (bias.astype(np.float64).ravel() + shift).astype(np.float32)
    blob = layer.blobs[1]
    values = blob.double_data if len(blob.double_data) else blob.data
    values[:] = corrected.tolist()  # in place: the blob keeps its shape fields, whichever Caffe wrote
    formats.write_caffemodel(out_path, model)
    return shift


def corrected_name(snapshot: Path) -> Path:
    """age_net_iter_800.caffemodel -> age_net_prior_iter_800.caffemodel (still a *_iter_N snapshot name, so
    evaluation and compilation take it as the newest)."""
    prefix, iteration = snapshot.name[:-len(".caffemodel")].rsplit("_iter_", 1)
    return snapshot.with_name(f"{prefix}_prior_iter_{iteration}.caffemodel")
