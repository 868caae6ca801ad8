"""Multiply-adds and parameters of a deploy net, counted from the layer table's shapes.

    python -m caffekit.cost caffe_models/joint_net/deploy.prototxt caffe_models/age_net/deploy.prototxt
"""
import sys
from typing import Dict

import numpy as np

from caffekit import formats, graph, layers


def net_cost(deploy) -> Dict[str, int]:
    """{"macs": multiply-adds per image, "params": learnable values} of a deploy prototxt (batch 1).
    Convolutions and inner products count their multiply-adds; the element-wise layers, a few per
    output value, are left out as every such count does."""
    net = formats.read_net(deploy)
    net_layers = graph.net_layers(net, graph.TEST, str(deploy))
    shapes = graph.blob_shapes(net_layers, graph.input_shapes(net, net_layers))
    macs = params = 0
    for layer in net_layers:
        if layer.type in layers.DATA_TYPES or not layer.bottom:
            continue
        blobs = layers.learnable_blobs(layer, [shapes[b] for b in layer.bottom])
        if layer.type != "BatchNorm":  # its blobs are statistics, folded away in the IR
            params += sum(int(np.prod(blob.shape)) for blob in blobs)
        if layer.type in ("Convolution", "InnerProduct"):
            weights = int(np.prod(blobs[0].shape))
            out = shapes[layer.top[0]]
            positions = int(np.prod(out[2:])) if len(out) > 2 else 1
            macs += weights * positions
    return {"macs": macs, "params": params}


def main(argv=None) -> None:
    for path in argv if argv is not None else sys.argv[1:]:
        cost = net_cost(path)
        print(f"{path}: {cost['macs'] / 1e9:.3f} G multiply-adds, {cost['params'] / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
