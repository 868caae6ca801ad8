"""Caffe layer type -> OpenVINO graph ops, opsets 1-8 only (OpenVINO 2022.3 and its MYRIAD plugin).

Each op is ``op(builder, layer, bottoms, shapes) -> [outputs]``: ``bottoms`` are ``ov.Output``s in the
layer's order, ``shapes`` gives Caffe's shapes of every blob, and ``builder`` makes weight constants
(f16 + Convert in FP16 IRs). BatchNorm and Scale are folded into a preceding convolution before the
graph is built (``openvino_ir.fold_batch_norm``); the ones left (e.g. a fixed Scale on the input)
become a per-channel multiply and add.
"""
import numpy as np

from caffekit import layers as layer_table
from caffekit.errors import KitError


def _padding_end(size: int, kernel: int, stride: int, pad: int, out: int) -> int:
    """End padding that makes floor rounding give Caffe's (rounded up) output size."""
    return max((out - 1) * stride + kernel - size - pad, 0)


def _convolution(b, layer, bottoms, shapes):
    p = layer.convolution_param
    weights = b.weights(layer)
    (kh, kw), stride, (ph, pw), dilation = layer_table.conv_geometry(p)
    w = weights[0].reshape(p.num_output, shapes[layer.bottom[0]][1] // p.group, kh, kw)
    if p.group == 1:
        y = b.op.convolution(bottoms[0], b.weight(w), list(stride), [ph, pw], [ph, pw], list(dilation))
    else:
        w = w.reshape(p.group, p.num_output // p.group, *w.shape[1:])
        y = b.op.group_convolution(bottoms[0], b.weight(w), list(stride), [ph, pw], [ph, pw], list(dilation))
    if len(weights) > 1:
        y = b.op.add(y, b.weight(weights[1], (1, p.num_output, 1, 1)))
    return [y]


def _pooling(b, layer, bottoms, shapes):
    p = layer.pooling_param
    bottom_shape, top_shape = shapes[layer.bottom[0]], shapes[layer.top[0]]
    (kh, kw), (sh, sw), (ph, pw) = layer_table.pool_geometry(p, bottom_shape[2:])
    h, w = bottom_shape[2:]
    end = [_padding_end(h, kh, sh, ph, top_shape[2]), _padding_end(w, kw, sw, pw, top_shape[3])]
    x = bottoms[0]
    if p.pool == p.MAX:
        # Caffe ignores padded cells in max pooling, as MaxPool does.
        return [b.op1.max_pool(x, [sh, sw], [ph, pw], end, [kh, kw], "floor")]
    if p.pool == p.AVE:
        # Caffe divides by the window clipped to the padded image: real padding counts
        # as zeros, the extra cells of the rounded-up last window do not. Pad explicitly,
        # then exclude only the remaining (rounding) padding.
        if ph or pw:
            x = b.op.pad(x, np.array([0, 0, ph, pw], np.int64), np.array([0, 0, ph, pw], np.int64),
                         "constant", np.float32(0))
            end = [max(end[0] - ph, 0), max(end[1] - pw, 0)]
        return [b.op.avg_pool(x, [sh, sw], [0, 0], end, [kh, kw], True, "floor")]
    raise KitError(f"layer {layer.name!r}: pooling method {p.pool} is not supported (MAX and AVE are)")


def _lrn(b, layer, bottoms, shapes):
    p = layer.lrn_param
    if p.norm_region != p.ACROSS_CHANNELS:
        raise KitError(f"layer {layer.name!r}: LRN norm_region WITHIN_CHANNEL is not supported")
    # Caffe: x / (k + alpha/n * sum(x^2))^beta over n channels, which is OpenVINO's LRN on axis 1.
    return [b.op.lrn(bottoms[0], np.array([1], np.int64), alpha=p.alpha, beta=p.beta, bias=p.k, size=p.local_size)]


def _inner_product(b, layer, bottoms, shapes):
    p = layer.inner_product_param
    weights = b.weights(layer)
    flat = b.op.reshape(bottoms[0], np.array([0, -1], np.int64), special_zero=True)
    y = b.op.matmul(flat, b.weight(weights[0].reshape(p.num_output, -1)), False, True)
    if len(weights) > 1:
        y = b.op.add(y, b.weight(weights[1], (1, p.num_output)))
    return [y]


def _relu(b, layer, bottoms, shapes):
    slope = layer.relu_param.negative_slope
    if slope == 0:
        return [b.op.relu(bottoms[0])]
    return [b.op.prelu(bottoms[0], np.array([slope], np.float32))]


def _channel_shape(layer, shapes):
    return (1, -1) + (1,) * (len(shapes[layer.bottom[0]]) - 2)


def _batch_norm(b, layer, bottoms, shapes):
    mean_sum, var_sum, weight_sum = b.weights(layer)
    factor = 0.0 if float(weight_sum.ravel()[0]) == 0 else 1.0 / float(weight_sum.ravel()[0])
    scale = 1.0 / np.sqrt(var_sum * factor + layer.batch_norm_param.eps)
    shape = _channel_shape(layer, shapes)
    y = b.op.multiply(bottoms[0], b.weight(scale.reshape(shape)))
    return [b.op.add(y, b.weight((-mean_sum * factor * scale).reshape(shape)))]


def _scale(b, layer, bottoms, shapes):
    weights = b.weights(layer)
    shape = _channel_shape(layer, shapes)
    y = b.op.multiply(bottoms[0], b.weight(weights[0].reshape(shape)))
    return [b.op.add(y, b.weight(weights[1].reshape(shape))) if len(weights) > 1 else y]


def _eltwise(b, layer, bottoms, shapes):
    p = layer.eltwise_param
    if p.operation == p.SUM:
        coeff = list(p.coeff) or [1.0] * len(bottoms)
        terms = [x if c == 1 else b.op.multiply(x, np.array(c, np.float32)) for c, x in zip(coeff, bottoms)]
    else:
        terms = bottoms
    combine = {p.SUM: b.op.add, p.PROD: b.op.multiply, p.MAX: b.op.maximum}[p.operation]
    y = terms[0]
    for x in terms[1:]:
        y = combine(y, x)
    return [y]


def _concat(b, layer, bottoms, shapes):
    axis = layer_table.concat_axis(layer) % len(shapes[layer.bottom[0]])
    return [b.op.concat(bottoms, axis)]


def _softmax(b, layer, bottoms, shapes):
    axis = layer.softmax_param.axis % len(shapes[layer.bottom[0]])  # SoftMax-1 wants axis >= 0
    return [b.op1.softmax(bottoms[0], axis)]


OPS = {
    "Convolution": _convolution, "Pooling": _pooling, "LRN": _lrn, "InnerProduct": _inner_product,
    "ReLU": _relu, "Dropout": lambda b, layer, bottoms, shapes: [bottoms[0]],  # identity at test time
    "BatchNorm": _batch_norm, "Scale": _scale, "Eltwise": _eltwise, "Concat": _concat, "Softmax": _softmax,
}
