"""Average the weights of several caffemodels of one net into one caffemodel (a "model soup").

Fine-tunes that start from the same pre-trained weights end in the same basin of the loss, so their
element-wise mean is itself a good net, usually at least as good as the average ingredient, and it
costs nothing at inference: one caffemodel, the same layers, what every engine already loads
(Wortsman et al. 2022, "Model soups"). Every blob is averaged in float64 and stored as float32.
"""
from pathlib import Path
from typing import List, Sequence

import numpy as np

from caffekit import formats
from caffekit.errors import KitError


def _stored_layers(model):
    return model.layer if len(model.layer) else model.layers


def _blob_values(blob):
    return blob.double_data if len(blob.double_data) else blob.data


def _blob_arrays(model, source: str) -> List[List[np.ndarray]]:
    arrays = []
    for layer in _stored_layers(model):
        try:
            arrays.append([formats.blob_to_array(blob).astype(np.float64) for blob in layer.blobs])
        except ValueError as exc:
            raise KitError(f"{source}: layer {layer.name}: {exc}") from None
    return arrays


def _signature(model, arrays) -> List[tuple]:
    return [(layer.name, tuple(array.shape for array in blobs)) for layer, blobs in zip(_stored_layers(model), arrays)]


def average(weight_paths: Sequence, out_path) -> int:
    """Write ``out_path``: the mean of ``weight_paths`` (same layers, same blob shapes), laid out like the
    first of them. Returns the number of ingredients."""
    paths = [Path(path) for path in weight_paths]
    if len(paths) < 2:
        raise KitError(f"{paths[0] if paths else out_path}: a soup needs at least two caffemodels")
    base = formats.read_caffemodel(paths[0])
    total = _blob_arrays(base, str(paths[0]))
    expected = _signature(base, total)
    for path in paths[1:]:
        model = formats.read_caffemodel(path)
        arrays = _blob_arrays(model, str(path))
        found = _signature(model, arrays)
        if found != expected:
            mismatch = next((f"{b}" for a, b in zip(expected, found) if a != b), f"{len(found)} layers")
            raise KitError(f"{path}: does not match {paths[0].name} (first difference: {mismatch}); "
                           f"only snapshots of one net can be averaged")
        for sums, blobs in zip(total, arrays):
            for blob_sum, array in zip(sums, blobs):
                blob_sum += array
    for layer, sums in zip(_stored_layers(base), total):
        for blob, blob_sum in zip(layer.blobs, sums):
            # in place: the blob keeps its shape fields, whichever Caffe wrote
            _blob_values(blob)[:] = (blob_sum / len(paths)).astype(np.float32).ravel().tolist()
    formats.write_caffemodel(out_path, base)
    return len(paths)
