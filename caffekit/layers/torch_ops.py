"""Caffe layer type -> torch computation, with Caffe's semantics where torch's defaults differ.

Each op is ``op(net, layer, bottoms) -> [tops]``: ``net`` is the ``torchnet.CaffeNet`` running it (its
phase, its blobs by layer name), ``bottoms`` the input tensors in the layer's order. Pooling rounds
up, LRN divides alpha by the window, Dropout and BatchNorm follow the phase rather than
``module.training``, losses normalise as Caffe's do.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from caffekit import layers as layer_table
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD: probabilities are clamped there before the log


def caffe_lrn(x: torch.Tensor, p: caffe_pb2.LRNParameter) -> torch.Tensor:
    size, alpha, beta, k = p.local_size, p.alpha, p.beta, p.k
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        # torch's LocalResponseNorm is Caffe's: k + alpha/size * sum of squares over a centred
        # window of channels (zero-padded); Caffe requires an odd size, where the paddings agree.
        return F.local_response_norm(x, size, alpha=alpha, beta=beta, k=k)
    # WITHIN_CHANNEL: Caffe averages squares over a size x size window, padding included
    # (AVE pooling with pad (size-1)/2), then scales by (1 + alpha * avg)^-beta; k is unused.
    pad = (size - 1) // 2
    avg = F.avg_pool2d(x * x, size, stride=1, padding=pad, count_include_pad=True)
    return x * (1.0 + alpha * avg).pow(-beta)


def _normalizer(loss_param: caffe_pb2.LossParameter, count: int, valid, outer: int):
    mode = loss_param.normalization
    if loss_param.HasField("normalize") and not loss_param.HasField("normalization"):
        mode = caffe_pb2.LossParameter.VALID if loss_param.normalize else caffe_pb2.LossParameter.BATCH_SIZE
    modes = caffe_pb2.LossParameter
    if mode == modes.FULL:
        return float(max(count, 1))
    if mode == modes.VALID:
        return valid.sum().float().clamp(min=1.0)
    if mode == modes.BATCH_SIZE:
        return float(max(outer, 1))
    return 1.0


def softmax_loss(logits: torch.Tensor, labels: torch.Tensor, layer: caffe_pb2.LayerParameter) -> torch.Tensor:
    """Caffe's SoftmaxWithLoss over axis 1 with its normalization modes."""
    loss_param = layer.loss_param
    axis = layer.softmax_param.axis if layer.HasField("softmax_param") else 1
    if axis != 1:
        raise KitError(f"layer {layer.name!r}: SoftmaxWithLoss over axis {axis} is not supported (only 1)")
    logits = logits.float()
    if logits.dim() > 2:  # N x C x H x W -> (N*H*W) x C, as Caffe's outer/inner loop
        logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    labels = labels.reshape(-1).long()
    ignore = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
    valid = labels != ignore if ignore is not None else torch.ones_like(labels, dtype=torch.bool)
    log_prob = F.log_softmax(logits, dim=1)
    picked = log_prob.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    # Caffe clamps the probability at FLT_MIN before the log.
    picked = torch.clamp(picked, min=math.log(np.finfo(np.float32).tiny))
    total = -(picked * valid).sum()
    return total / _normalizer(loss_param, labels.numel(), valid, logits.shape[0])


def infogain_loss(probs: torch.Tensor, labels: torch.Tensor, infogain: torch.Tensor) -> torch.Tensor:
    """Caffe's InfogainLoss (BVLC before 2017, and the oracle): ``-1/N sum_n sum_k H[l_n, k] log p_nk`` on
    PROBABILITIES (a Softmax layer feeds it). With row k of H a distribution around k, this is the
    cross-entropy to a soft label: label-distribution learning."""
    probs = probs.float().flatten(1)
    rows = infogain[labels.reshape(-1).long()]
    return -(rows * torch.log(probs.clamp(min=LOG_THRESHOLD))).sum() / probs.shape[0]


def accuracy(scores: torch.Tensor, labels: torch.Tensor, p: caffe_pb2.AccuracyParameter) -> torch.Tensor:
    """Caffe's Accuracy: correct when fewer than top_k classes score strictly higher than the label."""
    scores = scores.float()
    if p.axis != 1:
        raise KitError(f"Accuracy over axis {p.axis} is not supported (only 1)")
    if scores.dim() > 2:
        scores = scores.movedim(1, -1).reshape(-1, scores.shape[1])
    labels = labels.reshape(-1).long()
    valid = labels != p.ignore_label if p.HasField("ignore_label") else torch.ones_like(labels, dtype=torch.bool)
    true_score = scores.gather(1, torch.where(valid, labels, 0)[:, None])
    correct = ((scores > true_score).sum(1) < p.top_k) & valid
    return correct.sum().float() / valid.sum().clamp(min=1).float()


# ---------------------------------------------------------------- ops
def _convolution(net, layer, bottoms):
    weight, *bias = net.layer_params(layer.name)
    _, stride, pad, dilation = layer_table.conv_geometry(layer.convolution_param)
    return [F.conv2d(bottoms[0], weight, bias[0] if bias else None, stride, pad, dilation,
                     layer.convolution_param.group)]


def _relu(net, layer, bottoms):
    slope = layer.relu_param.negative_slope
    return [F.leaky_relu(bottoms[0], slope) if slope else F.relu(bottoms[0])]


def _pooling(net, layer, bottoms):
    x = bottoms[0]
    p = layer.pooling_param
    h, w = x.shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = layer_table.pool_geometry(p, (h, w))
    expected = (layer_table.pooled_size(h, kh, sh, ph), layer_table.pooled_size(w, kw, sw, pw))
    if p.pool == caffe_pb2.PoolingParameter.MAX:
        y = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=True)
    elif p.pool == caffe_pb2.PoolingParameter.AVE:
        # Caffe divides by the window clipped to the padded input, as torch's count_include_pad.
        y = F.avg_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=True, count_include_pad=True)
    else:
        raise KitError(f"{net.source}: layer {layer.name!r}: only MAX and AVE pooling are supported")
    if tuple(y.shape[2:]) != expected:
        raise KitError(f"{net.source}: layer {layer.name!r}: pooling geometry gives {tuple(y.shape[2:])} in "
                       f"torch but {expected} in Caffe (kernel smaller than stride?)")
    return [y]


def _inner_product(net, layer, bottoms):
    weight, *bias = net.layer_params(layer.name)
    return [F.linear(bottoms[0].flatten(1), weight, bias[0] if bias else None)]


def _dropout(net, layer, bottoms):
    # Caffe drops and scales by 1/(1-p) in TRAIN, and is the identity in TEST.
    ratio = layer.dropout_param.dropout_ratio
    return [F.dropout(bottoms[0], ratio, training=True) if net.phase == TRAIN and ratio > 0 else bottoms[0]]


def batch_norm_uses_global_stats(layer, phase) -> bool:
    p = layer.batch_norm_param
    return p.use_global_stats if p.HasField("use_global_stats") else phase != TRAIN


def batch_norm(net, layer, x, scale_layer=None):
    """Caffe's BatchNorm, and when given the Scale layer right after it, as one torch op. BatchNorm has no
    affine part; its blobs hold the SUMS of batch means and (m/(m-1)-corrected) variances, each decayed by
    moving_average_fraction, and the matching sum of weights in blob 2, which divides both when the
    global statistics are used. The Scale's gamma and beta go into the same fused op: in training that
    saves two passes over the activations and their gradients (JointNet: 1.1-1.2x faster steps on a CPU)."""
    mean_sum, var_sum, weight_sum = net.layer_params(layer.name)
    gamma, beta = None, None
    if scale_layer is not None:
        gamma, *bias = net.layer_params(scale_layer.name)
        beta = bias[0] if bias else None
    p = layer.batch_norm_param
    if batch_norm_uses_global_stats(layer, net.phase):
        factor = 0.0 if float(weight_sum[0]) == 0 else 1.0 / float(weight_sum[0])
        return F.batch_norm(x, mean_sum.detach() * factor, var_sum.detach() * factor, gamma, beta,
                            training=False, eps=p.eps)
    # torch's batch norm normalises by the batch mean and the biased variance, as Caffe does; with
    # momentum 1 it leaves in its running buffers the batch mean and the m/(m-1)-corrected variance,
    # exactly what Caffe adds to its sums, without another pass over x.
    batch_mean = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    batch_var = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    y = F.batch_norm(x, batch_mean, batch_var, gamma, beta, training=True, momentum=1.0, eps=p.eps)
    with torch.no_grad():
        fraction = float(p.moving_average_fraction)
        weight_sum.mul_(fraction).add_(1.0)
        mean_sum.mul_(fraction).add_(batch_mean)
        var_sum.mul_(fraction).add_(batch_var)
    return y


def _batch_norm(net, layer, bottoms):
    return [batch_norm(net, layer, bottoms[0])]


def _scale(net, layer, bottoms):
    gamma, *beta = net.layer_params(layer.name)
    shape = (1, -1) + (1,) * (bottoms[0].dim() - 2)
    y = bottoms[0] * gamma.view(shape)
    return [y + beta[0].view(shape) if beta else y]


def _eltwise(net, layer, bottoms):
    p = layer.eltwise_param
    op = p.operation
    if op == caffe_pb2.EltwiseParameter.SUM:
        coeff = list(p.coeff) or [1.0] * len(bottoms)
        y = bottoms[0] * coeff[0] if coeff[0] != 1 else bottoms[0]
        for c, b in zip(coeff[1:], bottoms[1:]):
            y = y + (b * c if c != 1 else b)
        return [y]
    y = bottoms[0]
    for b in bottoms[1:]:
        y = y * b if op == caffe_pb2.EltwiseParameter.PROD else torch.maximum(y, b)
    return [y]


def _concat(net, layer, bottoms):
    return [torch.cat(bottoms, dim=layer_table.concat_axis(layer))]


def _softmax(net, layer, bottoms):
    return [F.softmax(bottoms[0].float(), dim=layer.softmax_param.axis)]


def _softmax_with_loss(net, layer, bottoms):
    return [softmax_loss(bottoms[0], bottoms[1], layer)]


def _infogain_loss(net, layer, bottoms):
    if len(bottoms) > 2:
        infogain = bottoms[2].float().reshape(bottoms[2].shape[-2], bottoms[2].shape[-1])
    else:
        infogain = net.infogain(layer)
    return [infogain_loss(bottoms[0], bottoms[1], infogain)]


def _accuracy(net, layer, bottoms):
    return [accuracy(bottoms[0], bottoms[1], layer.accuracy_param)]


OPS = {
    "Convolution": _convolution, "ReLU": _relu, "Pooling": _pooling, "LRN": lambda n, l, b: [caffe_lrn(b[0], l.lrn_param)],
    "InnerProduct": _inner_product, "Dropout": _dropout, "BatchNorm": _batch_norm, "Scale": _scale,
    "Eltwise": _eltwise, "Concat": _concat, "Softmax": _softmax, "SoftmaxWithLoss": _softmax_with_loss,
    "InfogainLoss": _infogain_loss, "Accuracy": _accuracy,
}
