"""A torch ``nn.Module`` that executes a Caffe network definition with Caffe's semantics.

Built from ``caffekit.graph.net_layers`` (so V1 and V2 prototxts give the same module).
Blobs flow by name, as in Caffe, so in-place layers (ReLU, Dropout) need nothing special.
The points where torch's defaults differ from Caffe's are handled explicitly:
the layer types' computations are in ``caffekit.layers.torch_ops`` (pooling rounds up,
LRN divides alpha by the window, Dropout and BatchNorm follow the phase rather than
``module.training``); fillers follow Caffe's fan-in rules.
"""
import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from caffekit import formats, graph, layers as layer_table
from caffekit.errors import KitError
from caffekit.layers.torch_ops import OPS, accuracy, batch_norm, caffe_lrn, softmax_loss  # noqa: F401 (the ops' home)
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


# ---------------------------------------------------------------- the network
def execution_steps(layers, fuse: bool = True) -> List[Tuple[caffe_pb2.LayerParameter, object]]:
    """The layers to run, in order, as (layer, None), or with ``fuse`` (BatchNorm, Scale) where a Scale works
    in place on a BatchNorm's top right after it: nothing else can see the BatchNorm's own output then, so
    the two run as one op (``torch_ops.batch_norm``). Data layers are left out: their tops are the inputs."""
    steps, index = [], 0
    while index < len(layers):
        layer = layers[index]
        after = layers[index + 1] if index + 1 < len(layers) else None
        if (fuse and layer.type == "BatchNorm" and after is not None and after.type == "Scale" and len(layer.top) == 1
                and list(after.bottom) == list(layer.top) == list(after.top)):
            steps.append((layer, after))
            index += 2
            continue
        if layer.type not in layer_table.DATA_TYPES:
            steps.append((layer, None))
        index += 1
    return steps


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
        self._infogain: Dict[str, torch.Tensor] = {}
        for layer in self.layers:
            self._check_layer(layer)
            self._add_params(layer, generator)
        self.steps = execution_steps(self.layers)
        consumed = {b for layer in self.layers for b in layer.bottom}
        produced = [t for layer in self.layers for t in layer.top]
        # Caffe's net outputs: blobs produced and never consumed (in-place tops included).
        self.outputs = [t for i, t in enumerate(produced) if t not in consumed and t not in produced[i + 1:]]
        self.loss_weights = {}
        for layer in self.layers:
            weights = list(layer.loss_weight) or ([1.0] if layer.type in layer_table.LOSS_TYPES else [])
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
        elif layer.type == "InfogainLoss" and len(layer.bottom) < 3:
            self.infogain(layer)  # a missing or mis-sized matrix fails at construction, not mid-training
        elif layer.type == "InnerProduct":
            p = layer.inner_product_param
            if p.axis != 1 or p.transpose:
                raise KitError(f"{where}: inner product with axis {p.axis} / transpose is not supported")
        elif layer.type == "LRN":
            if layer.lrn_param.local_size % 2 == 0:
                raise KitError(f"{where}: LRN local_size must be odd (Caffe's rule)")

    def _add_params(self, layer, generator):
        if layer.type in layer_table.DATA_TYPES or not layer.bottom:
            return
        blobs = layer_table.learnable_blobs(layer, [self.shapes[b] for b in layer.bottom])
        params = []
        for index, blob in enumerate(blobs):
            spec = layer.param[index] if index < len(layer.param) else caffe_pb2.ParamSpec()
            value = fill(blob.shape, blob.filler, generator, f"{self.source}: layer {layer.name!r}")
            # BatchNorm's statistics change in the forward pass, never by gradient.
            param = nn.Parameter(value, requires_grad=layer.type != "BatchNorm")
            self.blobs.append(param)
            params.append(param)
            self.param_info.append(ParamInfo(layer.name, index, spec.lr_mult, spec.decay_mult))
        if params:
            self._layer_params[layer.name] = params

    def infogain(self, layer) -> torch.Tensor:
        """The infogain matrix H of an InfogainLoss layer, read once from its ``source`` file."""
        if layer.name not in self._infogain:
            source = layer.infogain_loss_param.source
            if not source:
                raise KitError(f"{self.source}: layer {layer.name!r}: infogain_loss_param.source is missing")
            matrix = formats.read_blob(source, "infogain matrix")
            classes = self.shapes[layer.bottom[0]][1]
            if matrix.size != classes * classes:
                raise KitError(f"{source}: infogain matrix has {matrix.size} values, layer {layer.name!r} "
                               f"needs {classes} x {classes}")
            self._infogain[layer.name] = torch.from_numpy(matrix.reshape(classes, classes).astype(np.float32))
        matrix = self._infogain[layer.name]
        device = self.blobs[0].device if len(self.blobs) else matrix.device
        if matrix.device != device:  # moved once, not copied to the GPU in every forward pass
            matrix = self._infogain[layer.name] = matrix.to(device)
        return matrix

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
        for layer, scale in self.steps:
            if scale is not None:
                blobs[scale.top[0]] = batch_norm(self, layer, blobs[layer.bottom[0]], scale)
                continue
            tops = OPS[layer.type](self, layer, [blobs[b] for b in layer.bottom])
            for top, value in zip(layer.top, tops):
                blobs[top] = value
        return blobs

    def loss(self, blobs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The net's objective: the weighted sum of its loss tops (Caffe's ForwardBackward value)."""
        total = None
        for top, weight in self.loss_weights.items():
            term = blobs[top].float().sum() * weight
            total = term if total is None else total + term
        if total is None:
            raise KitError(f"{self.source}: the TRAIN phase has no loss layer (e.g. SoftmaxWithLoss)")
        return total
