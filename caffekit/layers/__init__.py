"""The Caffe layer types the kit understands: one entry per type, as Caffe's LayerRegistry.

Each entry gives the type's shape rule (bottom shapes -> top shapes, by Caffe's rules: pooling rounds
up), its learnable blobs in Caffe's order with the fillers that initialise them, and its role:
``data`` layers feed the net, ``train_only`` layers (losses, accuracy) have no deploy-time meaning.
Backends map the remaining types to their own ops (``torch_ops.OPS``, ``openvino_ops.OPS``); a test
checks that each backend covers every type listed here.
"""
import math
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from caffekit.errors import KitError
from caffekit.proto import caffe_pb2

Shape = Tuple[int, ...]


class Blob(NamedTuple):
    """One learnable blob of a layer: its shape and the filler that initialises it."""
    shape: Shape
    filler: caffe_pb2.FillerParameter


class LayerType(NamedTuple):
    tops: Callable[[caffe_pb2.LayerParameter, List[Shape]], List[Shape]]
    blobs: Callable[[caffe_pb2.LayerParameter, List[Shape]], List[Blob]] = lambda layer, bottoms: []
    role: str = "compute"  # compute | data | train_only


# ---------------------------------------------------------------- geometry (Caffe's rules)
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


def constant(value: float = 0.0) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(type="constant", value=value)


def _filler(param, field: str, default: caffe_pb2.FillerParameter) -> caffe_pb2.FillerParameter:
    return getattr(param, field) if param.HasField(field) else default


# ---------------------------------------------------------------- shape rules
def _same(layer, bottoms):
    return [bottoms[0]] * max(len(layer.top), 1)


def _scalar(layer, bottoms):
    return [()]


def _convolution_tops(layer, bottoms):
    n, c, h, w = bottoms[0]
    p = layer.convolution_param
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv_geometry(p)
    return [(n, p.num_output, conv_size(h, kh, sh, ph, dh), conv_size(w, kw, sw, pw, dw))]


def _convolution_blobs(layer, bottoms):
    p = layer.convolution_param
    (kh, kw), _, _, _ = conv_geometry(p)
    blobs = [Blob((p.num_output, bottoms[0][1] // p.group, kh, kw), _filler(p, "weight_filler", constant()))]
    if p.bias_term:
        blobs.append(Blob((p.num_output,), _filler(p, "bias_filler", constant())))
    return blobs


def _pooling_tops(layer, bottoms):
    n, c, h, w = bottoms[0]
    (kh, kw), (sh, sw), (ph, pw) = pool_geometry(layer.pooling_param, (h, w))
    return [(n, c, pooled_size(h, kh, sh, ph), pooled_size(w, kw, sw, pw))]


def _inner_product_tops(layer, bottoms):
    return [(bottoms[0][0], layer.inner_product_param.num_output)]


def _inner_product_blobs(layer, bottoms):
    p = layer.inner_product_param
    blobs = [Blob((p.num_output, int(np.prod(bottoms[0][1:]))), _filler(p, "weight_filler", constant()))]
    if p.bias_term:
        blobs.append(Blob((p.num_output,), _filler(p, "bias_filler", constant())))
    return blobs


def _batch_norm_blobs(layer, bottoms):
    channels = bottoms[0][1] if len(bottoms[0]) > 1 else 1
    # mean sum, variance sum, and the moving-average scale factor that divides both
    return [Blob((channels,), constant()), Blob((channels,), constant()), Blob((1,), constant())]


def _scale_blobs(layer, bottoms):
    p = layer.scale_param
    if len(layer.bottom) != 1 or p.axis != 1 or p.num_axes != 1:
        raise KitError(f"layer {layer.name!r}: only Scale with one bottom, axis 1 and num_axes 1 is supported")
    channels = bottoms[0][1]
    blobs = [Blob((channels,), _filler(p, "filler", constant(1.0)))]
    if p.bias_term:
        blobs.append(Blob((channels,), _filler(p, "bias_filler", constant())))
    return blobs


def _eltwise_tops(layer, bottoms):
    if len(bottoms) < 2 or any(shape != bottoms[0] for shape in bottoms):
        raise KitError(f"layer {layer.name!r}: Eltwise needs two or more bottoms of one shape, got {bottoms}")
    coeff = layer.eltwise_param.coeff
    if coeff and len(coeff) != len(bottoms):
        raise KitError(f"layer {layer.name!r}: {len(coeff)} coeff for {len(bottoms)} bottoms")
    return [bottoms[0]]


def concat_axis(layer) -> int:
    p = layer.concat_param
    return p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim


def _concat_tops(layer, bottoms):
    axis = concat_axis(layer) % len(bottoms[0])
    if any(len(s) != len(bottoms[0]) or s[:axis] + s[axis + 1:] != bottoms[0][:axis] + bottoms[0][axis + 1:]
           for s in bottoms):
        raise KitError(f"layer {layer.name!r}: Concat bottoms differ outside axis {axis}: {bottoms}")
    shape = list(bottoms[0])
    shape[axis] = sum(s[axis] for s in bottoms)
    return [tuple(shape)]


TYPES: Dict[str, LayerType] = {
    "Input": LayerType(_same, role="data"),
    "Data": LayerType(_same, role="data"),
    "Convolution": LayerType(_convolution_tops, _convolution_blobs),
    "ReLU": LayerType(_same),
    "Pooling": LayerType(_pooling_tops),
    "LRN": LayerType(_same),
    "InnerProduct": LayerType(_inner_product_tops, _inner_product_blobs),
    "Dropout": LayerType(_same),
    "BatchNorm": LayerType(_same, _batch_norm_blobs),
    "Scale": LayerType(_same, _scale_blobs),
    "Eltwise": LayerType(_eltwise_tops),
    "Concat": LayerType(_concat_tops),
    "Softmax": LayerType(_same),
    "SoftmaxWithLoss": LayerType(_scalar, role="train_only"),
    "InfogainLoss": LayerType(_scalar, role="train_only"),
    "Accuracy": LayerType(_scalar, role="train_only"),
}
SUPPORTED_TYPES = tuple(TYPES)
DATA_TYPES = tuple(name for name, spec in TYPES.items() if spec.role == "data")
TRAIN_ONLY_TYPES = tuple(name for name, spec in TYPES.items() if spec.role == "train_only")
LOSS_TYPES = ("SoftmaxWithLoss", "InfogainLoss")  # loss_weight 1 on their top unless the prototxt says otherwise


def top_shapes(layer: caffe_pb2.LayerParameter, bottoms: Sequence[Shape]) -> List[Shape]:
    return TYPES[layer.type].tops(layer, list(bottoms))


def learnable_blobs(layer: caffe_pb2.LayerParameter, bottoms: Sequence[Shape]) -> List[Blob]:
    return TYPES[layer.type].blobs(layer, list(bottoms))
