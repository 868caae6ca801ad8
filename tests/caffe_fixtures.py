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


def random_weights(layers, shapes, seed: int = 0, logit_scale: float = 1.0, bias_std: float = 0.05):
    """``{layer: [weights, bias]}`` with fan-in (He) scaled weights and gaussian biases of
    ``bias_std``; the last learnable layer's weights are scaled by ``logit_scale`` too."""
    learnable = [(layer, graph.learnable_shapes(layer, shapes)) for layer in layers if layer.bottom]
    learnable = [(layer, blob_shapes) for layer, blob_shapes in learnable if blob_shapes]
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (layer, blob_shapes) in enumerate(learnable):
        fan_in = int(np.prod(blob_shapes[0][1:]))
        std = np.sqrt(2.0 / fan_in) * (logit_scale if i == len(learnable) - 1 else 1.0)
        arrays = [rng.normal(0, std, blob_shapes[0]).astype(np.float32)]
        if len(blob_shapes) > 1:
            arrays.append(rng.normal(0, bias_std, blob_shapes[1]).astype(np.float32))
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


def make_ir_tree(root, seed: int = 0):
    """``make_models_dir(root)`` plus ``models/ir`` with FP16 and FP32 IRs of both nets, as
    compile_ir.py lays it out. Returns (data_dir, models_dir)."""
    from caffekit import models as registry, openvino_ir

    data, models = make_models_dir(root, seed=seed)
    for task, net_name in TASK_NETS.items():
        net = openvino_ir.CaffeNet(REPO / "caffe_models" / net_name / "deploy.prototxt",
                                   next((models / net_name).glob("*.caffemodel")))
        images, source = openvino_ir.check_images(data, task, 227, count=2)
        for precision in ("FP16", "FP32"):
            openvino_ir.compile_precision(net, registry.model(task), precision, data / "mean.binaryproto",
                                          models / "ir", images, source)
    return data, models


# ---------------------------------------------------------------- V1 syntax
def to_v1(net):
    """A V1-syntax copy of a V2 NetParameter (``layers { type: CONVOLUTION }``, ``input_dim``),
    as the Levi & Hassner files are written. Blobs travel too, so this converts caffemodels."""
    from caffekit.proto import caffe_pb2

    v1 = caffe_pb2.NetParameter(name=net.name)
    enum = {name: value for value, name in graph._V1_TYPE_NAMES.items()}
    for layer in net.layer:
        if layer.type == "Input":
            v1.input.extend(layer.top)
            v1.input_dim.extend(layer.input_param.shape[0].dim)
            continue
        old = v1.layers.add(name=layer.name, type=enum[layer.type])
        old.bottom.extend(layer.bottom)
        old.top.extend(layer.top)
        old.blobs.extend(layer.blobs)
        for field in graph._V1_PARAM_FIELDS:
            if layer.HasField(field):
                getattr(old, field).CopyFrom(getattr(layer, field))
    return v1


# ---------------------------------------------------------------- LMDBs and face scenes
def write_lmdb(path, images_chw, labels):
    """A Caffe LMDB of raw uint8 Datums, keyed like convert_imageset ("%08d": read back in this order)."""
    import lmdb

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 31)
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(images_chw, labels)):
            txn.put(f"{i:08d}".encode(), formats.array_to_datum(image, label).SerializeToString())
    env.close()


def write_random_dataset(data_dir, task, train=40, test=20, size=MEAN_SIZE, seed=0):
    """Small train/test LMDBs of smooth random 256x256 images with random labels."""
    import cv2

    from caffekit import tasks

    rng = np.random.default_rng(seed)
    classes = len(tasks.labels(task))
    for split, count in (("train", train), ("test", test)):
        images = []
        for _ in range(count):
            small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            images.append(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1))
        write_lmdb(Path(data_dir) / "lmdb" / f"{task}_{split}_lmdb", images, rng.integers(0, classes, count))


def background(width=640, height=480, seed=0):
    """A smooth, face-free background (gradients and soft blobs)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def paste_faces(canvas, chips, places, side):
    """Paste face chips resized to ``side`` at ``places`` (x, y); returns the boxes (x, y, w, h)."""
    import cv2

    boxes = []
    for chip, (x, y) in zip(chips, places):
        canvas[y:y + side, x:x + side] = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA)
        boxes.append((x, y, side, side))
    return boxes


def iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / float(aw * ah + bw * bh - w * h)


def walking_face_video(path, chip, frames, step):
    """An MJPG 640x480 video at 25 FPS: ``chip`` (200 px) moving ``step`` pixels right a frame over grey."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
    for i in range(frames):
        frame = np.full((480, 640, 3), 90, np.uint8)
        frame[140:340, 40 + step * i:240 + step * i] = chip
        writer.write(frame)
    writer.release()
    return path
