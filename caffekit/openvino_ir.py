"""A Caffe classification net + caffemodel + mean file -> an OpenVINO IR, with checks.

The IR is built with OpenVINO's Python graph API (no Model Optimizer, no Caffe frontend:
both are gone from current OpenVINO). Only operations of opsets 1-8 are used so that
OpenVINO 2022.3, the last release with the MYRIAD plugin for the Neural Compute Stick 2,
can load the result; in fact every op of these nets is its opset-1 version (MaxPool-1 and
SoftMax-1 rather than the -8 ones), which every 2022.3 plugin implements. Preprocessing is part of the graph: the input is the u8 BGR image in
NHWC, and the IR converts it to f32 NCHW and subtracts the training mean itself, so a
runner never does arithmetic on pixels.

FP16 IRs store weights as f16 constants followed by a Convert, which is what
``ov.save_model(compress_to_fp16=True)`` writes, except that the mean image stays f32:
the compression pass would round it too, and the subtraction should be exactly the one
used in training.
"""
import hashlib
import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from caffekit import formats, graph, tasks
from caffekit.atomic import atomic_path
from caffekit.errors import KitError

MAX_OPSET = 8  # OpenVINO 2022.3 (MYRIAD) reads opsets 1-8
INPUT_NAME = "image"
OUTPUT_NAME = "prob"
INPUT_LAYOUT = "NHWC"
COLOUR_ORDER = "BGR"
PRECISIONS = ("FP16", "FP32", "INT8")
# Largest probability difference allowed between the IR and OpenCV's Caffe importer.
TOLERANCE = {"FP32": 1e-3, "FP16": 1e-2}
METADATA_VERSION = 1


def _ov():
    try:
        import openvino as ov
    except ImportError:
        raise KitError("OpenVINO is not installed (pip install 'openvino>=2023.1')") from None
    return ov


def _opset():
    import openvino.opset8 as opset  # later opsets would not load in OpenVINO 2022.3
    return opset


def _opset1():
    # MaxPool and SoftMax exist in opset 1 with all that Caffe needs; the first versions are the
    # ones every plugin of 2022.3 (MYRIAD included) implements natively.
    import openvino.opset1 as opset
    return opset


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- the Caffe side
class CaffeNet:
    """A deploy prototxt with its weights, checked against each other."""

    def __init__(self, deploy, caffemodel):
        self.deploy, self.caffemodel = Path(deploy), Path(caffemodel)
        net = formats.read_net(self.deploy)
        self.name = net.name or self.deploy.parent.name
        self.layers = [layer for layer in graph.net_layers(net, graph.TEST, source=str(self.deploy))
                       if layer.type not in graph.TRAIN_ONLY_TYPES]
        inputs = graph.input_shapes(net, self.layers)
        if len(inputs) != 1:
            raise KitError(f"{self.deploy}: expected one input blob, found {sorted(inputs) or 'none'}")
        (self.input_name, self.input_shape), = inputs.items()
        if len(self.input_shape) != 4 or self.input_shape[1] != 3 or self.input_shape[2] != self.input_shape[3]:
            raise KitError(f"{self.deploy}: input {self.input_name!r} has shape {self.input_shape}, "
                           f"expected 1 x 3 x S x S (a square BGR image)")
        self.shapes = graph.blob_shapes(self.layers, inputs)
        self.weights = graph.read_weights(formats.read_caffemodel(self.caffemodel))
        graph.check_weights(self.layers, self.shapes, self.weights, str(self.caffemodel))
        self.output_blob = self.layers[-1].top[0]

    @property
    def size(self) -> int:
        return int(self.input_shape[2])

    @property
    def classes(self) -> int:
        return int(np.prod(self.shapes[self.output_blob][1:]))


def mean_crop(mean_chw: np.ndarray, size: int, source="mean file") -> np.ndarray:
    """The centre ``size`` x ``size`` crop of a mean image, as Caffe's test-phase transform takes it."""
    channels, height, width = mean_chw.shape
    if height < size or width < size:
        raise KitError(f"{source}: mean image is {height}x{width}, smaller than the {size}x{size} input")
    top, left = (height - size) // 2, (width - size) // 2
    crop = mean_chw[:, top:top + size, left:left + size]
    if channels == 1:
        crop = np.repeat(crop, 3, axis=0)
    return np.ascontiguousarray(crop, dtype=np.float32)


# ---------------------------------------------------------------- the graph
def _padding_end(size: int, kernel: int, stride: int, pad: int, out: int) -> int:
    """End padding that makes floor rounding give Caffe's (rounded up) output size."""
    return max((out - 1) * stride + kernel - size - pad, 0)


class _Builder:
    def __init__(self, fp16_weights: bool):
        self.op = _opset()
        self.ov = _ov()
        self.fp16_weights = fp16_weights

    def weight(self, array: np.ndarray, shape=None):
        array = np.asarray(array, np.float32)
        if shape is not None:
            array = array.reshape(shape)
        if not self.fp16_weights:
            return self.op.constant(array)
        return self.op.convert(self.op.constant(array.astype(np.float16)), self.ov.Type.f32)

    def convolution(self, x, layer, weights, bottom_shape):
        p = layer.convolution_param
        (kh, kw), stride, (ph, pw), dilation = graph.conv_geometry(p)
        w = weights[0].reshape(p.num_output, bottom_shape[1] // p.group, kh, kw)
        if p.group == 1:
            y = self.op.convolution(x, self.weight(w), list(stride), [ph, pw], [ph, pw], list(dilation))
        else:
            w = w.reshape(p.group, p.num_output // p.group, *w.shape[1:])
            y = self.op.group_convolution(x, self.weight(w), list(stride), [ph, pw], [ph, pw], list(dilation))
        if p.bias_term:
            y = self.op.add(y, self.weight(weights[1], (1, p.num_output, 1, 1)))
        return y

    def pooling(self, x, layer, bottom_shape, top_shape):
        p = layer.pooling_param
        (kh, kw), (sh, sw), (ph, pw) = graph.pool_geometry(p, bottom_shape[2:])
        h, w = bottom_shape[2:]
        end = [_padding_end(h, kh, sh, ph, top_shape[2]), _padding_end(w, kw, sw, pw, top_shape[3])]
        if p.pool == p.MAX:
            # Caffe ignores padded cells in max pooling, as MaxPool does.
            return _opset1().max_pool(x, [sh, sw], [ph, pw], end, [kh, kw], "floor")
        if p.pool == p.AVE:
            # Caffe divides by the window clipped to the padded image: real padding counts
            # as zeros, the extra cells of the rounded-up last window do not. Pad explicitly,
            # then exclude only the remaining (rounding) padding.
            if ph or pw:
                x = self.op.pad(x, np.array([0, 0, ph, pw], np.int64), np.array([0, 0, ph, pw], np.int64),
                                "constant", np.float32(0))
                end = [max(end[0] - ph, 0), max(end[1] - pw, 0)]
            return self.op.avg_pool(x, [sh, sw], [0, 0], end, [kh, kw], True, "floor")
        raise KitError(f"layer {layer.name!r}: pooling method {p.pool} is not supported (MAX and AVE are)")

    def lrn(self, x, layer):
        p = layer.lrn_param
        if p.norm_region != p.ACROSS_CHANNELS:
            raise KitError(f"layer {layer.name!r}: LRN norm_region WITHIN_CHANNEL is not supported")
        # Caffe: x / (k + alpha/n * sum(x^2))^beta over n channels, which is OpenVINO's LRN on axis 1.
        return self.op.lrn(x, np.array([1], np.int64), alpha=p.alpha, beta=p.beta, bias=p.k, size=p.local_size)

    def inner_product(self, x, layer, weights):
        p = layer.inner_product_param
        flat = self.op.reshape(x, np.array([0, -1], np.int64), special_zero=True)
        w = weights[0].reshape(p.num_output, -1)
        y = self.op.matmul(flat, self.weight(w), False, True)
        if p.bias_term:
            y = self.op.add(y, self.weight(weights[1], (1, p.num_output)))
        return y

    def relu(self, x, layer):
        slope = layer.relu_param.negative_slope
        if slope == 0:
            return self.op.relu(x)
        return self.op.prelu(x, np.array([slope], np.float32))


def build_model(net: CaffeNet, mean: np.ndarray, fp16_weights: bool = False):
    """The ``ov.Model`` of ``net`` with preprocessing in front: u8 BGR NHWC image in, probabilities out."""
    ov, op = _ov(), _opset()
    builder = _Builder(fp16_weights)
    size = net.size
    image = op.parameter([1, size, size, 3], ov.Type.u8, name=INPUT_NAME)
    image.set_layout(ov.Layout(INPUT_LAYOUT))
    image.output(0).get_tensor().set_names({INPUT_NAME})
    x = op.convert(image, ov.Type.f32)
    x = op.transpose(x, np.array([0, 3, 1, 2], np.int64))
    x = op.subtract(x, op.constant(mean[np.newaxis].astype(np.float32)))  # f32 even in FP16 IRs
    blobs = {net.input_name: x.output(0)}
    for layer in net.layers:
        if layer.type in graph.DATA_TYPES:
            continue
        bottom = blobs[layer.bottom[0]]
        bottom_shape = net.shapes[layer.bottom[0]]
        top_shape = net.shapes[layer.top[0]]
        weights = net.weights.get(layer.name, [])
        if layer.type == "Convolution":
            y = builder.convolution(bottom, layer, weights, bottom_shape)
        elif layer.type == "Pooling":
            y = builder.pooling(bottom, layer, bottom_shape, top_shape)
        elif layer.type == "LRN":
            y = builder.lrn(bottom, layer)
        elif layer.type == "InnerProduct":
            y = builder.inner_product(bottom, layer, weights)
        elif layer.type == "ReLU":
            y = builder.relu(bottom, layer)
        elif layer.type == "Dropout":
            y = bottom  # identity at test time (Caffe scales during training)
        elif layer.type == "Softmax":
            y = _opset1().softmax(bottom, layer.softmax_param.axis % len(bottom_shape))  # SoftMax-1: axis >= 0
        else:
            raise KitError(f"{net.deploy}: layer {layer.name!r} of type {layer.type!r} has no OpenVINO mapping")
        if not isinstance(y, ov.Output):
            y = y.output(0)
        if y is not bottom:
            y.get_node().set_friendly_name(layer.name)
        got = tuple(y.get_partial_shape().to_shape())
        if got != tuple(top_shape):
            raise KitError(f"{net.deploy}: layer {layer.name!r} gives shape {got} in OpenVINO, "
                           f"Caffe's rules give {tuple(top_shape)}")
        blobs[layer.top[0]] = y
    out = blobs[net.output_blob]
    out.get_tensor().set_names({OUTPUT_NAME})
    result = op.result(out)
    result.set_friendly_name(OUTPUT_NAME)
    return ov.Model([result], [image], net.name)


# ---------------------------------------------------------------- inference helpers
def compile_for_cpu(model_or_xml, precision_hint: Optional[str] = "f32"):
    """A CPU CompiledModel; ``precision_hint`` f32 stops OpenVINO from running FP32 IRs in bf16."""
    ov = _ov()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
    model = core.read_model(str(model_or_xml)) if isinstance(model_or_xml, (str, Path)) else model_or_xml
    return core.compile_model(model, "CPU", config)


def ir_probabilities(compiled, images_hwc: Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities of each u8 BGR H x W x 3 image through a compiled IR."""
    request = compiled.create_infer_request()
    out = []
    for image in images_hwc:
        result = request.infer({0: image[np.newaxis]})
        out.append(np.array(next(iter(result.values()))).reshape(-1))
    return np.stack(out)


def opencv_probabilities(net: CaffeNet, mean: np.ndarray, images_hwc: Sequence[np.ndarray]) -> np.ndarray:
    """The same images through OpenCV's Caffe importer (the reference for the numerical check)."""
    from caffekit.evaluation import OpenCvClassifier

    batch = np.stack([image.transpose(2, 0, 1) for image in images_hwc]).astype(np.float32) - mean[np.newaxis]
    return OpenCvClassifier(net.deploy, net.caffemodel).probabilities(batch)


def opencv_reference_problem(net: CaffeNet) -> Optional[str]:
    """Why OpenCV's Caffe importer would compute something else than Caffe for ``net``, or None.

    OpenCV 4.x ignores ``lrn_param.k`` (it always uses 1); real Caffe and the IR honour it.
    """
    odd = [layer.name for layer in net.layers if layer.type == "LRN" and layer.lrn_param.k != 1]
    if odd:
        return f"OpenCV's Caffe importer ignores LRN k != 1 (layers {', '.join(odd)})"
    return None


def centre_crop(image_hwc: np.ndarray, size: int) -> np.ndarray:
    height, width = image_hwc.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image_hwc[top:top + size, left:left + size])


def lmdb_images(path, size: int, limit: Optional[int] = None, seed: int = 0) -> Tuple[List[np.ndarray], np.ndarray]:
    """Centre crops (u8 BGR HWC) and labels of an LMDB's Datums: all, or a seeded random sample of ``limit``."""
    from caffekit.lmdb_data import LmdbSource

    source = LmdbSource(path)
    try:
        count = len(source)
        positions = range(count) if limit is None or limit >= count else \
            sorted(np.random.default_rng(seed).choice(count, limit, replace=False).tolist())
        images, labels = [], []
        for position in positions:
            image, label = source.image_label(position)
            images.append(centre_crop(image.transpose(1, 2, 0), size))
            labels.append(label)
    finally:
        source.close()
    return images, np.array(labels)


def generated_images(size: int, count: int, seed: int = 0) -> List[np.ndarray]:
    """Smooth random u8 BGR images (stand-ins for faces when no test LMDB exists yet)."""
    import cv2

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 12, image.shape)
        images.append(np.clip(image + noise, 0, 255).astype(np.uint8))
    return images


# ---------------------------------------------------------------- IR files
def ir_paths(ir_root, net_name: str, precision: str) -> Dict[str, Path]:
    """The files of one IR: ``<ir_root>/<net>/<precision>/<net>.{xml,bin,json,...}``."""
    return ir_files(Path(ir_root) / net_name / precision, net_name)


def ir_files(folder, net_name: str) -> Dict[str, Path]:
    folder = Path(folder)
    return {"folder": folder, "xml": folder / f"{net_name}.xml", "bin": folder / f"{net_name}.bin",
            "json": folder / f"{net_name}.json", "deploy": folder / f"{net_name}.deploy.prototxt",
            "mean": folder / f"{net_name}.mean.npy"}


def xml_op_versions(xml_path) -> List[Tuple[str, str, str]]:
    """(layer name, type, opset version) of every op in an IR's XML."""
    try:
        root = ET.parse(str(xml_path)).getroot()
    except (ET.ParseError, OSError) as exc:
        raise KitError(f"{xml_path}: not a readable IR XML ({exc})") from None
    return [(layer.get("name"), layer.get("type"), layer.get("version", "")) for layer in root.iter("layer")]


def newer_ops(xml_path, max_opset: int = MAX_OPSET) -> List[str]:
    """Ops of an IR from an opset above ``max_opset`` (which OpenVINO 2022.3 could not load)."""
    bad = []
    for name, op_type, version in xml_op_versions(xml_path):
        match = re.fullmatch(r"opset(\d+)", version)
        if not match or int(match.group(1)) > max_opset:
            bad.append(f"{name} ({op_type}, {version or 'no version'})")
    return bad


def task_metadata(task: str) -> dict:
    meta = {"task": task, "net": tasks.TASKS[task]["net"], "labels": list(tasks.labels(task))}
    if task == "age":
        meta["age_bin_edges"] = list(tasks.AGE_BIN_EDGES)
        meta["age_bin_centres"] = list(tasks.AGE_BIN_CENTRES)
    return meta


def metadata(task: str, net: CaffeNet, precision: str, mean_file, mean_image_size, extra=None) -> dict:
    ov = _ov()
    paths = ir_paths(".", tasks.TASKS[task]["net"], precision)
    meta = {
        "format": "agegender-edge-kit IR metadata",
        "version": METADATA_VERSION,
        **task_metadata(task),
        "precision": precision,
        "input": {"name": INPUT_NAME, "shape": [1, net.size, net.size, 3], "layout": INPUT_LAYOUT,
                  "element_type": "u8", "colour_order": COLOUR_ORDER,
                  "preprocessing": "baked into the IR: u8 -> f32, NHWC -> NCHW, minus the mean crop"},
        # How the training images were framed: the face chip resized to training_size, then the
        # centre input-size crop (Caffe's test-phase transform).
        "training_size": int(mean_image_size),
        "output": {"name": OUTPUT_NAME, "classes": net.classes},
        "mean": {"source": str(Path(mean_file).resolve()), "sha256": sha256(mean_file),
                 "crop": f"centre {net.size}x{net.size}", "file": paths["mean"].name},
        "caffe": {"deploy": paths["deploy"].name, "deploy_source": str(net.deploy.resolve()),
                  "caffemodel": str(net.caffemodel.resolve()), "caffemodel_sha256": sha256(net.caffemodel)},
        "opset": f"ops from opsets 1-{MAX_OPSET} only, so OpenVINO 2022.3 (MYRIAD plugin) loads it",
        "openvino": ov.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta.update(extra or {})
    return meta


def set_rt_labels(model, meta: dict) -> None:
    """Labels in the IR's rt_info too, for tools that read only the XML."""
    model.set_rt_info(meta["task"], ["agegender", "task"])
    model.set_rt_info(" ".join(label.replace(" ", "_") for label in meta["labels"]), ["agegender", "labels"])


def write_ir(model, net: CaffeNet, mean: np.ndarray, folder: Path, meta: dict, check=None) -> dict:
    """Write the IR and its companions into ``folder`` atomically.

    ``check(tmp_paths) -> dict`` runs on the written files before they are moved into place;
    it may raise to leave nothing behind, and what it returns is merged into the JSON.
    """
    ov = _ov()
    folder = Path(folder)
    name = folder.parent.name
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        paths = ir_files(tmp, name)
        ov.save_model(model, str(paths["xml"]), compress_to_fp16=False)  # FP16 weights are built in
        shutil.copyfile(net.deploy, paths["deploy"])
        np.save(paths["mean"], mean)
        bad = newer_ops(paths["xml"])
        if bad:
            raise KitError(f"{folder}: IR uses ops newer than opset{MAX_OPSET}: {', '.join(bad)}")
        meta = dict(meta)
        if check is not None:
            meta.update(check(paths))
        paths["json"].write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def max_prob_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


# ---------------------------------------------------------------- compile steps
CHECK_IMAGES = 8  # images in the IR-vs-OpenCV check: enough to see a systematic error


def lmdb_path(data_dir, task: str, split: str) -> Path:
    return Path(data_dir) / "lmdb" / f"{task}_{split}_lmdb"


def check_images(data_dir, task: str, size: int, count: int = CHECK_IMAGES):
    """Images for the numerical check: test-LMDB centre crops when the dataset exists, else generated ones."""
    path = lmdb_path(data_dir, task, "test")
    if (path / "data.mdb").is_file():
        images, _ = lmdb_images(path, size, count)
        return images, f"{len(images)} images of {path}"
    return generated_images(size, count), f"{count} generated images (no test LMDB at {path})"


def compile_precision(net: CaffeNet, task: str, precision: str, mean_file, ir_root, images, images_source) -> dict:
    """Build, write and check one FP16 or FP32 IR; returns its metadata (with the measured difference)."""
    mean_image = formats.read_mean(mean_file)
    mean = mean_crop(mean_image, net.size, str(mean_file))
    model = build_model(net, mean, fp16_weights=precision == "FP16")
    meta = metadata(task, net, precision, mean_file, mean_image.shape[1])
    set_rt_labels(model, meta)
    problem = opencv_reference_problem(net)
    reference = None if problem else opencv_probabilities(net, mean, images)
    folder = ir_paths(ir_root, tasks.TASKS[task]["net"], precision)["folder"]

    def check(paths):
        if problem:
            return {"check": {"skipped": problem}}
        # f32 inference precision for both: on CPUs with bf16 OpenVINO would otherwise round
        # activations, and the check is about the IR, not about the device's arithmetic.
        probs = ir_probabilities(compile_for_cpu(paths["xml"], "f32"), images)
        diff = max_prob_difference(probs, reference)
        if diff > TOLERANCE[precision]:
            raise KitError(f"{folder}: IR and OpenCV's Caffe importer differ by {diff:.3g} in probability "
                           f"(allowed {TOLERANCE[precision]:g}) on {images_source}")
        # For information: the CPU's own default precision (bf16 where the CPU has it), closer to
        # what reduced-precision devices such as the NCS2 (fp16 arithmetic) do to activations.
        default = ir_probabilities(compile_for_cpu(paths["xml"], None), images)
        return {"check": {"reference": f"OpenCV {_cv2_version()} Caffe importer", "images": images_source,
                          "max_prob_difference": diff, "tolerance": TOLERANCE[precision],
                          "inference_precision": "f32",
                          "max_prob_difference_cpu_default_precision": max_prob_difference(default, reference)}}

    return write_ir(model, net, mean, folder, meta, check)


def _cv2_version() -> str:
    import cv2
    return cv2.__version__


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels))


CALIBRATION_IMAGES = 300


def quantize_int8(net: CaffeNet, task: str, mean_file, ir_root, data_dir,
                  calibration_count: int = CALIBRATION_IMAGES, progress=print) -> dict:
    """INT8 IR by NNCF post-training quantization, calibrated on train images; reports the
    test accuracy against the FP32 model (both on CPU, FP32 at f32 precision)."""
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    mean_image = formats.read_mean(mean_file)
    mean = mean_crop(mean_image, net.size, str(mean_file))
    calibration, _ = lmdb_images(lmdb_path(data_dir, task, "train"), net.size, calibration_count, seed=1)
    test_images, test_labels = lmdb_images(lmdb_path(data_dir, task, "test"), net.size)
    model = build_model(net, mean)
    fp32_probs = ir_probabilities(compile_for_cpu(model, "f32"), test_images)
    progress(f"{tasks.TASKS[task]['net']}: quantizing on {len(calibration)} train images")
    quantized = nncf.quantize(model, nncf.Dataset(calibration, lambda image: image[np.newaxis]),
                              subset_size=len(calibration))
    meta = metadata(task, net, "INT8", mean_file, mean_image.shape[1])
    set_rt_labels(quantized, meta)
    folder = ir_paths(ir_root, tasks.TASKS[task]["net"], "INT8")["folder"]

    def check(paths):
        int8_probs = ir_probabilities(compile_for_cpu(paths["xml"], None), test_images)
        fp32_acc, int8_acc = accuracy(fp32_probs, test_labels), accuracy(int8_probs, test_labels)
        return {"int8": {"method": f"NNCF {nncf.__version__} post-training quantization",
                         "calibration_images": len(calibration),
                         "calibration_source": str(lmdb_path(data_dir, task, "train")),
                         "test_images": len(test_images), "fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc,
                         "accuracy_loss_points": 100 * (fp32_acc - int8_acc),
                         "agreement_with_fp32": float(np.mean(fp32_probs.argmax(1) == int8_probs.argmax(1))),
                         "max_prob_difference": max_prob_difference(fp32_probs, int8_probs)}}

    return write_ir(quantized, net, mean, folder, meta, check)
