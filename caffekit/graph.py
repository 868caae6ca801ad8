"""One normalized view of a Caffe network, whatever syntax its file uses.

Every backend (the torch trainer, the OpenVINO compiler, evaluation) starts from
``net_layers()``: V2 ``LayerParameter`` messages, V1 ``layers`` upgraded the way
Caffe's own ``UpgradeV1Net`` does, filtered to one phase. Shape inference follows
Caffe's rounding rules (pooling rounds up), which differ from most frameworks.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from caffekit.errors import KitError
from caffekit.formats import array_to_blob, blob_to_array
from caffekit.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

from caffekit.layers import (DATA_TYPES, SUPPORTED_TYPES, TRAIN_ONLY_TYPES, conv_geometry, conv_size,  # noqa: F401
                             learnable_blobs, pool_geometry, pooled_size, top_shapes)

_V1 = caffe_pb2.V1LayerParameter
_V1_TYPE_NAMES = {
    _V1.ACCURACY: "Accuracy", _V1.CONVOLUTION: "Convolution", _V1.DATA: "Data",
    _V1.DROPOUT: "Dropout", _V1.INNER_PRODUCT: "InnerProduct", _V1.LRN: "LRN",
    _V1.POOLING: "Pooling", _V1.RELU: "ReLU", _V1.SOFTMAX: "Softmax",
    _V1.SOFTMAX_LOSS: "SoftmaxWithLoss", _V1.CONCAT: "Concat", _V1.ELTWISE: "Eltwise",
    _V1.INFOGAIN_LOSS: "InfogainLoss",
}
_V1_PARAM_FIELDS = (
    "accuracy_param", "convolution_param", "data_param", "dropout_param",
    "inner_product_param", "lrn_param", "pooling_param", "relu_param",
    "softmax_param", "transform_param", "loss_param",
)


def upgrade_v1_layer(old: caffe_pb2.V1LayerParameter) -> caffe_pb2.LayerParameter:
    """A V2 LayerParameter equal to a V1 one (blobs_lr/weight_decay become ParamSpecs)."""
    type_name = _V1_TYPE_NAMES.get(old.type)
    if type_name is None:
        type_name = _V1.LayerType.Name(old.type) if old.type in _V1.LayerType.values() else str(old.type)
    layer = caffe_pb2.LayerParameter(name=old.name, type=type_name)
    layer.bottom.extend(old.bottom)
    layer.top.extend(old.top)
    layer.include.extend(old.include)
    layer.exclude.extend(old.exclude)
    layer.loss_weight.extend(old.loss_weight)
    layer.blobs.extend(old.blobs)
    for i in range(max(len(old.blobs_lr), len(old.weight_decay), len(old.param))):
        spec = layer.param.add()
        if i < len(old.param):
            spec.name = old.param[i]
        if i < len(old.blobs_lr):
            spec.lr_mult = old.blobs_lr[i]
        if i < len(old.weight_decay):
            spec.decay_mult = old.weight_decay[i]
    for field in _V1_PARAM_FIELDS:
        if old.HasField(field):
            getattr(layer, field).CopyFrom(getattr(old, field))
    return layer


def all_layers(net: caffe_pb2.NetParameter) -> List[caffe_pb2.LayerParameter]:
    """Every layer of ``net`` as V2 messages (a file uses one syntax or the other)."""
    if net.layer and net.layers:
        raise KitError(f"network {net.name!r} mixes V1 'layers' and V2 'layer' entries")
    if net.layers:
        return [upgrade_v1_layer(old) for old in net.layers]
    return list(net.layer)


def _rule_matches(rule: caffe_pb2.NetStateRule, phase: int) -> bool:
    return not rule.HasField("phase") or rule.phase == phase


def in_phase(layer: caffe_pb2.LayerParameter, phase: Optional[int]) -> bool:
    """Caffe's NetStateRule check, for the phase part (levels and stages are not used here)."""
    if phase is None:
        return True
    if layer.HasField("phase") and layer.phase != phase:
        return False
    if layer.include:
        return any(_rule_matches(rule, phase) for rule in layer.include)
    return not any(_rule_matches(rule, phase) for rule in layer.exclude)


def net_layers(net: caffe_pb2.NetParameter, phase: Optional[int] = None,
               source: str = "network") -> List[caffe_pb2.LayerParameter]:
    """The layers of ``net`` active in ``phase``; unknown layer types are an error."""
    layers = [layer for layer in all_layers(net) if in_phase(layer, phase)]
    for layer in layers:
        if layer.type not in SUPPORTED_TYPES:
            raise KitError(f"{source}: layer {layer.name!r} has unsupported type {layer.type!r} "
                           f"(supported: {', '.join(SUPPORTED_TYPES)})")
    return layers


# ---------------------------------------------------------------- shapes
def inference_layers(net: caffe_pb2.NetParameter, source: str) -> List[caffe_pb2.LayerParameter]:
    """The layers a deploy net runs at inference: its TEST phase without train-only types (Dropout, ...)."""
    return [layer for layer in net_layers(net, TEST, source=source) if layer.type not in TRAIN_ONLY_TYPES]


def input_shapes(net: caffe_pb2.NetParameter, layers: Sequence[caffe_pb2.LayerParameter]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the net's declared inputs (``input`` + ``input_shape``/``input_dim``, or Input layers)."""
    shapes = {}
    for i, name in enumerate(net.input):
        if net.input_shape:
            shapes[name] = tuple(net.input_shape[i].dim)
        elif net.input_dim:
            shapes[name] = tuple(net.input_dim[4 * i:4 * i + 4])
    for layer in layers:
        if layer.type == "Input":
            for top, shape in zip(layer.top, layer.input_param.shape):
                shapes[top] = tuple(shape.dim)
    return shapes


def blob_shapes(layers: Sequence[caffe_pb2.LayerParameter], inputs: Dict[str, Tuple[int, ...]]):
    """Every blob's shape through the net, by Caffe's rules (``caffekit.layers``)."""
    shapes = dict(inputs)
    for layer in layers:
        if layer.type in DATA_TYPES:
            continue
        missing = [b for b in layer.bottom if b not in shapes]
        if missing:
            raise KitError(f"layer {layer.name!r} reads blob {missing[0]!r}, which no earlier layer produces")
        for top, shape in zip(layer.top, top_shapes(layer, [shapes[b] for b in layer.bottom])):
            shapes[top] = shape
    return shapes


# ---------------------------------------------------------------- weights
def learnable_shapes(layer: caffe_pb2.LayerParameter, shapes: Dict[str, Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """Shapes of a layer's weight blobs in Caffe's order (e.g. weights, then bias), given the blob shapes."""
    if not layer.bottom or layer.type in DATA_TYPES:
        return []
    return [blob.shape for blob in learnable_blobs(layer, [shapes[b] for b in layer.bottom])]


def read_weights(model: caffe_pb2.NetParameter) -> Dict[str, List[np.ndarray]]:
    """``{layer name: [arrays]}`` of a caffemodel (V1 or V2 syntax)."""
    return {layer.name: [blob_to_array(b) for b in layer.blobs]
            for layer in all_layers(model) if layer.blobs}


def weights_to_model(name: str, layers: Sequence[caffe_pb2.LayerParameter],
                     weights: Dict[str, Sequence[np.ndarray]]) -> caffe_pb2.NetParameter:
    """A caffemodel NetParameter: the layer definitions with their trained blobs, as Caffe's
    ``Net::ToProto`` writes them."""
    model = caffe_pb2.NetParameter(name=name)
    for layer in layers:
        entry = model.layer.add()
        entry.CopyFrom(layer)
        del entry.blobs[:]
        for array in weights.get(layer.name, ()):
            entry.blobs.append(array_to_blob(array))
    return model


def check_weights(layers, shapes, weights, source: str) -> None:
    """Raise a KitError naming ``source`` when a blob is missing or has the wrong size, or when the model has
    weights for layers the prototxt lacks: Caffe would ignore them, but here they mean weights trained for
    another definition (e.g. JointNet's four-block trunk under the three-block deploy net, whose shapes match).

    Sizes, not shapes, are compared: old caffemodels store fully connected weights
    as 1 x 1 x out x in, which Caffe accepts too.
    """
    defined = {layer.name for layer in layers}
    extra = [name for name in weights if name not in defined]
    if extra:
        listed = ", ".join(repr(name) for name in extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise KitError(f"{source}: has weights for layers the prototxt does not define ({listed}): trained from "
                       "another network definition? Give its deploy prototxt")
    for layer in layers:
        expected = learnable_shapes(layer, shapes)
        if not expected:
            continue
        got = weights.get(layer.name)
        if got is None:
            raise KitError(f"{source}: no weights for layer {layer.name!r}")
        if len(got) != len(expected) or any(a.size != int(np.prod(s)) for a, s in zip(got, expected)):
            raise KitError(f"{source}: layer {layer.name!r} has blobs of shape {[tuple(a.shape) for a in got]}, "
                           f"the prototxt needs {expected}")
