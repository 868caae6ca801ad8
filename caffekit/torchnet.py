"""A torch ``nn.Module`` that executes a Caffe network definition with Caffe's semantics.

Built from ``caffekit.graph.net_layers`` (so V1 and V2 prototxts give the same module).
Blobs flow by name, as in Caffe, so in-place layers (ReLU, Dropout) need nothing special.
The points where torch's defaults differ from Caffe's are handled explicitly:
pooling rounds up (checked against ``graph.pooled_size``), LRN divides alpha by the
window size, Dropout follows the phase rather than ``module.training``, the softmax
loss divides by the number of valid labels, and fillers follow Caffe's fan-in rules.
"""
import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caffekit import graph
from caffekit.errors import KitError
from caffekit.proto import caffe_pb2

TRAIN, TEST = graph.TRAIN, graph.TEST


class ParamInfo(NamedTuple):
    """One learnable blob, in Caffe's ``learnable_params`` order (layer order; weights, then bias)."""
    layer: str
    index: int
    lr_mult: float
    decay_mult: float


# ---------------------------------------------------------------- fillers
def fill(shape: Sequence[int], filler: caffe_pb2.FillerParameter, generator: torch.Generator,
         where: str) -> torch.Tensor:
    """A float32 tensor filled as Caffe's ``GetFiller(filler)->Fill`` would (same distributions;
    the random stream is torch's, not Caffe's)."""
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape))
    # Caffe's legacy accessors: num() = shape(0), channels() = shape(1) or 1.
    fan_in = count // shape[0]
    fan_out = count // (shape[1] if len(shape) > 1 else 1)
    kind = filler.type
    out = torch.empty(shape, dtype=torch.float32)
    if kind == "constant":
        return out.fill_(filler.value)
    if kind == "uniform":
        return out.uniform_(filler.min, filler.max, generator=generator)
    if kind == "gaussian":
        out.normal_(filler.mean, filler.std, generator=generator)
        if filler.sparse >= 0:
            # Caffe keeps each weight with probability sparse / num_outputs (2-D blobs only).
            if len(shape) != 2:
                raise KitError(f"{where}: sparse gaussian filler needs a 2-D blob, got shape {shape}")
            keep = torch.rand(shape, generator=generator) < filler.sparse / shape[0]
            out *= keep
        return out
    if kind in ("xavier", "msra"):
        norm = caffe_pb2.FillerParameter
        n = {norm.FAN_IN: fan_in, norm.FAN_OUT: fan_out,
             norm.AVERAGE: (fan_in + fan_out) / 2.0}[filler.variance_norm]
        if kind == "xavier":
            scale = math.sqrt(3.0 / n)
            return out.uniform_(-scale, scale, generator=generator)
        return out.normal_(0.0, math.sqrt(2.0 / n), generator=generator)
    raise KitError(f"{where}: unsupported filler type {kind!r} "
                   "(supported: constant, uniform, gaussian, xavier, msra)")


def _default_filler() -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(type="constant", value=0)


# ---------------------------------------------------------------- layers
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
    mode = loss_param.normalization
    if loss_param.HasField("normalize") and not loss_param.HasField("normalization"):
        mode = caffe_pb2.LossParameter.VALID if loss_param.normalize else caffe_pb2.LossParameter.BATCH_SIZE
    modes = caffe_pb2.LossParameter
    if mode == modes.FULL:
        normalizer = float(labels.numel())
    elif mode == modes.VALID:
        normalizer = valid.sum().float()
    elif mode == modes.BATCH_SIZE:
        normalizer = float(logits.shape[0])  # outer_num_ for axis 1 of an N x C blob
    else:
        normalizer = 1.0
    if isinstance(normalizer, torch.Tensor):
        normalizer = torch.clamp(normalizer, min=1.0)
    else:
        normalizer = max(normalizer, 1.0)
    return total / normalizer


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


# ---------------------------------------------------------------- the network
class CaffeNet(nn.Module):
    """The layers of one phase of a Caffe net. ``forward({'data': x, 'label': y})`` returns every blob."""

    def __init__(self, net: caffe_pb2.NetParameter, phase: int, input_shapes: Dict[str, Tuple[int, ...]],
                 source: str = "network", seed: int = 0):
        super().__init__()
        self.phase = phase
        self.source = source
        self.layers = graph.net_layers(net, phase, source)
        self.input_shapes = dict(input_shapes)
        shapes = dict(self.input_shapes)
        shapes.update(graph.input_shapes(net, self.layers))
        self.shapes = graph.blob_shapes(self.layers, shapes)
        self.blobs = nn.ParameterList()
        self.param_info: List[ParamInfo] = []
        self._layer_params: Dict[str, List[nn.Parameter]] = {}
        generator = torch.Generator().manual_seed(int(seed))
        for layer in self.layers:
            self._check_layer(layer)
            if layer.type in ("Convolution", "InnerProduct"):
                self._add_params(layer, generator)
        consumed = {b for layer in self.layers for b in layer.bottom}
        produced = [t for layer in self.layers for t in layer.top]
        # Caffe's net outputs: blobs produced and never consumed (in-place tops included).
        self.outputs = [t for i, t in enumerate(produced) if t not in consumed and t not in produced[i + 1:]]
        self.loss_weights = {}
        for layer in self.layers:
            weights = list(layer.loss_weight) or ([1.0] if layer.type == "SoftmaxWithLoss" else [])
            for top, weight in zip(layer.top, weights):
                if weight:
                    self.loss_weights[top] = float(weight)

    # -- construction
    def _check_layer(self, layer):
        where = f"{self.source}: layer {layer.name!r}"
        if layer.type == "Convolution":
            p = layer.convolution_param
            if p.axis != 1:
                raise KitError(f"{where}: convolution axis {p.axis} is not supported")
        elif layer.type == "Pooling":
            p = layer.pooling_param
            if p.pool not in (caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE):
                raise KitError(f"{where}: only MAX and AVE pooling are supported")
        elif layer.type == "InnerProduct":
            p = layer.inner_product_param
            if p.axis != 1 or p.transpose:
                raise KitError(f"{where}: inner product with axis {p.axis} / transpose is not supported")
        elif layer.type == "LRN":
            if layer.lrn_param.local_size % 2 == 0:
                raise KitError(f"{where}: LRN local_size must be odd (Caffe's rule)")

    def _add_params(self, layer, generator):
        bottom_shape = self.shapes[layer.bottom[0]]
        shapes = graph.learnable_shapes(layer, bottom_shape)
        p = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
        fillers = [p.weight_filler if p.HasField("weight_filler") else _default_filler(),
                   p.bias_filler if p.HasField("bias_filler") else _default_filler()]
        params = []
        for index, shape in enumerate(shapes):
            spec = layer.param[index] if index < len(layer.param) else caffe_pb2.ParamSpec()
            value = fill(shape, fillers[index], generator, f"{self.source}: layer {layer.name!r}")
            param = nn.Parameter(value)
            self.blobs.append(param)
            params.append(param)
            self.param_info.append(ParamInfo(layer.name, index, spec.lr_mult, spec.decay_mult))
        self._layer_params[layer.name] = params

    # -- weights
    def params(self) -> List[nn.Parameter]:
        """Learnable blobs in Caffe's order (matches ``param_info`` and a solverstate's history)."""
        return list(self.blobs)

    def layer_params(self, name: str) -> List[nn.Parameter]:
        return self._layer_params.get(name, [])

    def share_params(self, other: "CaffeNet") -> None:
        """Use ``other``'s parameter tensors for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        for name, params in self._layer_params.items():
            theirs = other.layer_params(name)
            for i, mine in enumerate(params):
                if i < len(theirs) and theirs[i].shape == mine.shape:
                    params[i] = theirs[i]
        self.blobs = nn.ParameterList([p for name in self._layer_params for p in self._layer_params[name]])

    def weights(self) -> Dict[str, List[np.ndarray]]:
        """``{layer: [float32 arrays]}`` for ``graph.weights_to_model``."""
        return {name: [p.detach().float().cpu().numpy().copy() for p in params]
                for name, params in self._layer_params.items()}

    def load_weights(self, weights: Dict[str, Sequence[np.ndarray]], source: str,
                     require_all: bool = False) -> List[str]:
        """Copy blobs from a caffemodel by layer name, as Caffe's CopyTrainedLayersFrom.

        Layers the model lacks keep their filler values (fine-tuning) unless ``require_all``;
        returns the names of the layers that were copied. Blob sizes must agree.
        """
        copied = []
        for name, params in self._layer_params.items():
            arrays = weights.get(name)
            if arrays is None:
                if require_all:
                    raise KitError(f"{source}: no weights for layer {name!r}")
                continue
            if len(arrays) != len(params) or any(a.size != p.numel() for a, p in zip(arrays, params)):
                raise KitError(f"{source}: layer {name!r} has blobs of shape {[tuple(a.shape) for a in arrays]}, "
                               f"the network needs {[tuple(p.shape) for p in params]}")
            with torch.no_grad():
                for array, param in zip(arrays, params):
                    param.copy_(torch.from_numpy(np.asarray(array, np.float32).reshape(param.shape)))
            copied.append(name)
        return copied

    # -- execution
    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        blobs = dict(inputs)
        train = self.phase == TRAIN
        for layer in self.layers:
            kind = layer.type
            if kind in graph.DATA_TYPES:
                continue
            x = blobs[layer.bottom[0]]
            if kind == "Convolution":
                weight, *bias = self._layer_params[layer.name]
                _, stride, pad, dilation = graph.conv_geometry(layer.convolution_param)
                y = F.conv2d(x, weight, bias[0] if bias else None, stride, pad, dilation,
                             layer.convolution_param.group)
            elif kind == "ReLU":
                slope = layer.relu_param.negative_slope
                y = F.leaky_relu(x, slope) if slope else F.relu(x)
            elif kind == "Pooling":
                y = self._pool(layer, x)
            elif kind == "LRN":
                y = caffe_lrn(x, layer.lrn_param)
            elif kind == "InnerProduct":
                weight, *bias = self._layer_params[layer.name]
                y = F.linear(x.flatten(1), weight, bias[0] if bias else None)
            elif kind == "Dropout":
                # Caffe drops and scales by 1/(1-p) in TRAIN, and is the identity in TEST.
                ratio = layer.dropout_param.dropout_ratio
                y = F.dropout(x, ratio, training=True) if train and ratio > 0 else x
            elif kind == "Softmax":
                axis = layer.softmax_param.axis
                y = F.softmax(x.float(), dim=axis)
            elif kind == "SoftmaxWithLoss":
                y = softmax_loss(x, blobs[layer.bottom[1]], layer)
            elif kind == "Accuracy":
                y = accuracy(x, blobs[layer.bottom[1]], layer.accuracy_param)
            else:  # net_layers() already rejected anything else
                raise KitError(f"{self.source}: layer {layer.name!r} has unsupported type {kind!r}")
            blobs[layer.top[0]] = y
        return blobs

    def _pool(self, layer, x):
        p = layer.pooling_param
        h, w = x.shape[2:]
        (kh, kw), (sh, sw), (ph, pw) = graph.pool_geometry(p, (h, w))
        expected = (graph.pooled_size(h, kh, sh, ph), graph.pooled_size(w, kw, sw, pw))
        if p.pool == caffe_pb2.PoolingParameter.MAX:
            y = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=True)
        else:
            # Caffe divides by the window clipped to the padded input, as torch's count_include_pad.
            y = F.avg_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=True, count_include_pad=True)
        if tuple(y.shape[2:]) != expected:
            raise KitError(f"{self.source}: layer {layer.name!r}: pooling geometry gives {tuple(y.shape[2:])} in "
                           f"torch but {expected} in Caffe (kernel smaller than stride?)")
        return y

    def loss(self, blobs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The net's objective: the weighted sum of its loss tops (Caffe's ForwardBackward value)."""
        total = None
        for top, weight in self.loss_weights.items():
            term = blobs[top].float().sum() * weight
            total = term if total is None else total + term
        if total is None:
            raise KitError(f"{self.source}: the TRAIN phase has no loss layer (e.g. SoftmaxWithLoss)")
        return total
