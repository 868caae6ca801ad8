"""One normalized view of a Caffe network, whatever syntax its file uses.

Every backend (the torch trainer, the OpenVINO compiler, evaluation) starts from
``net_layers()``: V2 ``LayerParameter`` messages, V1 ``layers`` upgraded the way
Caffe's own ``UpgradeV1Net`` does, filtered to one phase. Shape inference follows
Caffe's rounding rules (pooling rounds up), which differ from most frameworks.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from caffekit.errors import KitError
from caffekit.formats import array_to_blob, blob_to_array
from caffekit.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

# Layer types every backend of the kit implements.
SUPPORTED_TYPES = (
    "Input", "Data", "Convolution", "ReLU", "Pooling", "LRN", "InnerProduct",
    "Dropout", "Softmax", "SoftmaxWithLoss", "Accuracy",
)
# Types that carry no computation at deploy time.
DATA_TYPES = ("Input", "Data")
TRAIN_ONLY_TYPES = ("SoftmaxWithLoss", "Accuracy")

_V1 = caffe_pb2.V1LayerParameter
_V1_TYPE_NAMES = {
    _V1.ACCURACY: "Accuracy", _V1.CONVOLUTION: "Convolution", _V1.DATA: "Data",
    _V1.DROPOUT: "Dropout", _V1.INNER_PRODUCT: "InnerProduct", _V1.LRN: "LRN",
    _V1.POOLING: "Pooling", _V1.RELU: "ReLU", _V1.SOFTMAX: "Softmax",
    _V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
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


# ---------------------------------------------------------------- geometry
def _pair(repeated, single_h, single_w, default):
    """Caffe's (h, w) from a repeated field or its _h/_w overrides."""
    if single_h is not None and single_w is not None:
        return int(single_h), int(single_w)
    values = list(repeated) if repeated is not None else []
    if not values:
        return default, default
    return (int(values[0]), int(values[-1]))


def conv_geometry(param: caffe_pb2.ConvolutionParameter):
    """((kh, kw), (sh, sw), (ph, pw), (dh, dw)) of a convolution."""
    has = param.HasField
    kernel = _pair(param.kernel_size, param.kernel_h if has("kernel_h") else None,
                   param.kernel_w if has("kernel_w") else None, 0)
    stride = _pair(param.stride, param.stride_h if has("stride_h") else None,
                   param.stride_w if has("stride_w") else None, 1)
    pad = _pair(param.pad, param.pad_h if has("pad_h") else None,
                param.pad_w if has("pad_w") else None, 0)
    dilation = _pair(param.dilation, None, None, 1)
    return kernel, stride, pad, dilation


def pool_geometry(param: caffe_pb2.PoolingParameter, input_hw=None):
    """((kh, kw), (sh, sw), (ph, pw)) of a pooling layer (global pooling uses ``input_hw``)."""
    if param.global_pooling:
        return tuple(input_hw), (1, 1), (0, 0)
    has = param.HasField
    kernel = (param.kernel_h, param.kernel_w) if has("kernel_h") else (param.kernel_size,) * 2
    stride = (param.stride_h, param.stride_w) if has("stride_h") else (param.stride,) * 2
    pad = (param.pad_h, param.pad_w) if has("pad_h") else (param.pad,) * 2
    return tuple(map(int, kernel)), tuple(map(int, stride)), tuple(map(int, pad))


def pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooling output size: rounds up, then drops a window starting in the padding."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def conv_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


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
    """Every blob's shape through the net, by Caffe's rules."""
    shapes = dict(inputs)
    for layer in layers:
        if layer.type in DATA_TYPES:
            continue
        missing = [b for b in layer.bottom if b not in shapes]
        if missing:
            raise KitError(f"layer {layer.name!r} reads blob {missing[0]!r}, which no earlier layer produces")
        n, *rest = shapes[layer.bottom[0]]
        if layer.type == "Convolution":
            c, h, w = rest
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv_geometry(layer.convolution_param)
            out = (n, layer.convolution_param.num_output, conv_size(h, kh, sh, ph, dh), conv_size(w, kw, sw, pw, dw))
        elif layer.type == "Pooling":
            c, h, w = rest
            (kh, kw), (sh, sw), (ph, pw) = pool_geometry(layer.pooling_param, (h, w))
            out = (n, c, pooled_size(h, kh, sh, ph), pooled_size(w, kw, sw, pw))
        elif layer.type == "InnerProduct":
            out = (n, layer.inner_product_param.num_output)
        elif layer.type in ("SoftmaxWithLoss", "Accuracy"):
            out = ()
        else:  # element-wise layers keep the shape
            out = shapes[layer.bottom[0]]
        for top in layer.top:
            shapes[top] = out
    return shapes


# ---------------------------------------------------------------- weights
def learnable_shapes(layer: caffe_pb2.LayerParameter, bottom_shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    """Shapes of a layer's weight blobs, in Caffe's order (weights, then bias)."""
    if layer.type == "Convolution":
        p = layer.convolution_param
        (kh, kw), _, _, _ = conv_geometry(p)
        shapes = [(p.num_output, bottom_shape[1] // p.group, kh, kw)]
        return shapes + [(p.num_output,)] if p.bias_term else shapes
    if layer.type == "InnerProduct":
        p = layer.inner_product_param
        shapes = [(p.num_output, int(np.prod(bottom_shape[1:])))]
        return shapes + [(p.num_output,)] if p.bias_term else shapes
    return []


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
    """Raise a KitError naming ``source`` when a blob is missing or has the wrong size.

    Sizes, not shapes, are compared: old caffemodels store fully connected weights
    as 1 x 1 x out x in, which Caffe accepts too.
    """
    for layer in layers:
        expected = learnable_shapes(layer, shapes[layer.bottom[0]]) if layer.bottom else []
        if not expected:
            continue
        got = weights.get(layer.name)
        if got is None:
            raise KitError(f"{source}: no weights for layer {layer.name!r}")
        if len(got) != len(expected) or any(a.size != int(np.prod(s)) for a, s in zip(got, expected)):
            raise KitError(f"{source}: layer {layer.name!r} has blobs of shape {[tuple(a.shape) for a in got]}, "
                           f"the prototxt needs {expected}")
