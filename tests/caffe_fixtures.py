"""Caffe files with random weights, written by the kit's own Caffe-format code.

Until trained snapshots exist, the compiler and the runner are tested on these. Weights use
He initialisation (std = sqrt(2 / fan_in)) rather than the prototxt's tiny fillers, so the
activations stay in a realistic range and the probabilities are far from uniform: a wrong
layer then shows up as a large difference, not as 1/classes versus 1/classes.
"""
from pathlib import Path

import numpy as np

from caffekit import formats, graph

REPO = Path(__file__).resolve().parents[1]
TASK_NETS = {"age": "age_net", "gender": "gender_net"}
MEAN_SIZE = 256


def random_weights(layers, shapes, seed: int = 0, logit_scale: float = 1.0):
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in layers:
        if not layer.bottom:
            continue
        blob_shapes = graph.learnable_shapes(layer, shapes[layer.bottom[0]])
        if not blob_shapes:
            continue
        fan_in = int(np.prod(blob_shapes[0][1:]))
        w = rng.normal(0, np.sqrt(2.0 / fan_in), blob_shapes[0]).astype(np.float32)
        arrays = [w]
        if len(blob_shapes) > 1:
            arrays.append(rng.normal(0, 0.05, blob_shapes[1]).astype(np.float32))
        weights[layer.name] = arrays
    return weights


def write_random_caffemodel(deploy, path, seed: int = 0, logit_std: float = 1.5):
    """A caffemodel for ``deploy`` with random weights; returns its path.

    The last layer is rescaled (measured with OpenCV on a random input) so its logits have
    about ``logit_std``: confident but not one-hot probabilities.
    """
    import cv2

    net = formats.read_net(deploy)
    layers = graph.net_layers(net, graph.TEST)
    shapes = graph.blob_shapes(layers, graph.input_shapes(net, layers))
    weights = random_weights(layers, shapes, seed)
    formats.write_caffemodel(path, graph.weights_to_model(net.name, layers, weights))
    last = [layer for layer in layers if layer.name in weights][-1]
    reference = cv2.dnn.readNetFromCaffe(str(deploy), str(path))
    shape = graph.input_shapes(net, layers)
    (size,) = {s[2] for s in shape.values()}
    rng = np.random.default_rng(seed)
    reference.setInput(rng.normal(0, 50, (4, 3, size, size)).astype(np.float32))
    logits = reference.forward(last.top[0])
    scale = logit_std / max(float(np.std(logits - logits.mean(axis=1, keepdims=True))), 1e-6)
    weights[last.name] = [array * scale for array in weights[last.name]]
    formats.write_caffemodel(path, graph.weights_to_model(net.name, layers, weights))
    return Path(path)


def write_random_mean(path, size: int = MEAN_SIZE, seed: int = 0):
    """A smooth BGR mean image around mid-grey, like a real face mean."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    mean = np.stack([100 + 30 * yy, 110 + 20 * xx, 130 + 10 * (xx + yy)]) + rng.normal(0, 2, (3, size, size))
    formats.write_mean(path, mean.astype(np.float32))
    return Path(path)


def make_models_dir(root, tasks=("age", "gender"), seed: int = 0):
    """``root/data/mean.binaryproto`` and ``root/models/<net>/random_iter_1.caffemodel``, as the
    dataset and training stages lay them out. Returns (data_dir, models_dir)."""
    root = Path(root)
    data, models = root / "data", root / "models"
    write_random_mean(data / "mean.binaryproto", seed=seed)
    for i, task in enumerate(tasks):
        net = TASK_NETS[task]
        write_random_caffemodel(REPO / "caffe_models" / net / "deploy.prototxt",
                                models / net / f"{net}_random_iter_1.caffemodel", seed=seed + i)
    return data, models
