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

from caffekit import formats, graph, models, tasks
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
        self.layers = graph.inference_layers(net, str(self.deploy))
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
        # Caffe's net outputs: blobs produced and never read afterwards (in-place tops included).
        consumed = {b for layer in self.layers for b in layer.bottom}
        produced = [t for layer in self.layers for t in layer.top]
        self.output_blobs = [t for i, t in enumerate(produced) if t not in consumed and t not in produced[i + 1:]]
        # One output keeps the IR's historical name; several keep their blob names (the heads).
        self.output_names = [OUTPUT_NAME] if len(self.output_blobs) == 1 else list(self.output_blobs)
        self.output_blob = self.output_blobs[0]

    @property
    def size(self) -> int:
        return int(self.input_shape[2])

    @property
    def classes(self) -> int:
        return self.output_size(self.output_blob)

    def output_size(self, blob: str) -> int:
        return int(np.prod(self.shapes[blob][1:]))


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
def fold_batch_norm(layers, weights):
    """(layers, weights) with each BatchNorm (and a Scale right after it) that follows a convolution
    folded into that convolution's weights and bias: the IR then has one op where Caffe had three, as
    the NCS2 likes. Folding happens in float64 from Caffe's own statistics (sums / scale factor)."""
    weights = {name: [np.asarray(a, np.float64) for a in arrays] for name, arrays in weights.items()}
    producer, read_since_written, kept = {}, {}, []
    for layer in layers:
        blob = layer.bottom[0] if len(layer.bottom) == 1 else None
        conv = producer.get(blob)
        # In place on a convolution's output that nothing has read yet: Caffe's order makes it part of
        # that convolution.
        if (layer.type in ("BatchNorm", "Scale") and conv is not None and conv.type == "Convolution"
                and list(layer.top) == [blob] and not read_since_written.get(blob)):
            w, *bias = weights[conv.name]
            bias = bias[0].ravel() if bias else np.zeros(w.shape[0])
            if layer.type == "BatchNorm":
                mean_sum, var_sum, weight_sum = (a.ravel() for a in weights[layer.name])
                factor = 0.0 if weight_sum[0] == 0 else 1.0 / weight_sum[0]
                scale = 1.0 / np.sqrt(var_sum * factor + layer.batch_norm_param.eps)
                shift = -mean_sum * factor * scale
            else:
                scale, *beta = (a.ravel() for a in weights[layer.name])
                shift = beta[0] if beta else np.zeros_like(scale)
            weights[conv.name] = [w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), bias * scale + shift]
            continue
        kept.append(layer)
        for bottom in layer.bottom:
            read_since_written[bottom] = True
        for top in layer.top:
            producer[top], read_since_written[top] = layer, False
    return kept, weights


class _Builder:
    """Weight constants for the ops of ``openvino_ops``: f32, or f16 + Convert in FP16 IRs."""

    def __init__(self, weights, fp16_weights: bool):
        self.op, self.op1, self.ov = _opset(), _opset1(), _ov()
        self._weights = weights
        self.fp16_weights = fp16_weights

    def weights(self, layer):
        return self._weights.get(layer.name, [])

    def weight(self, array: np.ndarray, shape=None):
        array = np.asarray(array, np.float32)
        if shape is not None:
            array = array.reshape(shape)
        if not self.fp16_weights:
            return self.op.constant(array)
        return self.op.convert(self.op.constant(array.astype(np.float16)), self.ov.Type.f32)


def build_model(net: CaffeNet, mean: np.ndarray, fp16_weights: bool = False):
    """The ``ov.Model`` of ``net`` with preprocessing in front: u8 BGR NHWC image in, one result per head."""
    from caffekit.layers.openvino_ops import OPS

    ov, op = _ov(), _opset()
    layers, weights = fold_batch_norm(net.layers, net.weights)
    builder = _Builder(weights, fp16_weights)
    size = net.size
    image = op.parameter([1, size, size, 3], ov.Type.u8, name=INPUT_NAME)
    image.set_layout(ov.Layout(INPUT_LAYOUT))
    image.output(0).get_tensor().set_names({INPUT_NAME})
    x = op.convert(image, ov.Type.f32)
    x = op.transpose(x, np.array([0, 3, 1, 2], np.int64))
    x = op.subtract(x, op.constant(mean[np.newaxis].astype(np.float32)))  # f32 even in FP16 IRs
    blobs = {net.input_name: x.output(0)}
    for layer in layers:
        if layer.type in graph.DATA_TYPES:
            continue
        if layer.type not in OPS:
            raise KitError(f"{net.deploy}: layer {layer.name!r} of type {layer.type!r} has no OpenVINO mapping")
        bottoms = [blobs[b] for b in layer.bottom]
        for top, y in zip(layer.top, OPS[layer.type](builder, layer, bottoms, net.shapes)):
            if not isinstance(y, ov.Output):
                y = y.output(0)
            if all(y is not bottom for bottom in bottoms):
                y.get_node().set_friendly_name(layer.name)
            got = tuple(y.get_partial_shape().to_shape())
            if got != tuple(net.shapes[top]):
                raise KitError(f"{net.deploy}: layer {layer.name!r} gives shape {got} in OpenVINO, "
                               f"Caffe's rules give {tuple(net.shapes[top])}")
            blobs[top] = y
    results = []
    for blob, name in zip(net.output_blobs, net.output_names):
        out = blobs[blob]
        out.get_tensor().set_names({name})
        result = op.result(out)
        result.set_friendly_name(name)
        results.append(result)
    return ov.Model(results, [image], net.name)


# ---------------------------------------------------------------- inference helpers
def compile_for_cpu(model_or_xml, precision_hint: Optional[str] = "f32"):
    """A CPU CompiledModel; ``precision_hint`` f32 stops OpenVINO from running FP32 IRs in bf16."""
    ov = _ov()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
    model = core.read_model(str(model_or_xml)) if isinstance(model_or_xml, (str, Path)) else model_or_xml
    return core.compile_model(model, "CPU", config)


def ir_outputs(compiled, images_hwc: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """{output name: N x size} for u8 BGR H x W x 3 images through a compiled IR."""
    request = compiled.create_infer_request()
    names = [output.get_any_name() for output in compiled.outputs]
    out: Dict[str, list] = {name: [] for name in names}
    for image in images_hwc:
        request.infer({0: image[np.newaxis]})
        for name, output in zip(names, compiled.outputs):
            out[name].append(np.array(request.get_tensor(output).data).reshape(-1))
    return {name: np.stack(values) for name, values in out.items()}


def ir_probabilities(compiled, images_hwc: Sequence[np.ndarray]) -> np.ndarray:
    """The first output of each image through a compiled IR (the only one of a one-task net)."""
    return next(iter(ir_outputs(compiled, images_hwc).values()))


def opencv_outputs(net: CaffeNet, mean: np.ndarray, images_hwc: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """The same images through OpenCV's Caffe importer (the reference for the numerical check), by IR name."""
    from caffekit.evaluation import OpenCvClassifier

    batch = np.stack([image.transpose(2, 0, 1) for image in images_hwc]).astype(np.float32) - mean[np.newaxis]
    outputs = OpenCvClassifier(net.deploy, net.caffemodel).outputs(batch, net.output_blobs)
    return dict(zip(net.output_names, (outputs[blob] for blob in net.output_blobs)))


def opencv_probabilities(net: CaffeNet, mean: np.ndarray, images_hwc: Sequence[np.ndarray]) -> np.ndarray:
    """The first output through OpenCV's Caffe importer (the only one of a one-task net)."""
    return next(iter(opencv_outputs(net, mean, images_hwc).values()))


def output_difference(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> float:
    """The largest difference over all outputs; a value head in years counts in units of 100 years, so every
    output is compared on a 0-1 scale."""
    return max(float(np.max(np.abs(a[name] - b[name]))) / (models.AGE_YEARS_MAX if name == "age_years" else 1.0)
               for name in a)


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


def model_metadata(entry: models.Model, net: CaffeNet) -> dict:
    """What the runner reads about the net's heads: "outputs" (name, task, labels, size) for every model,
    and the one-task fields (task, labels, output) that runners of the Levi & Hassner pair read."""
    outputs = []
    for head in entry.heads:
        name = head.output if len(net.output_blobs) > 1 else OUTPUT_NAME
        blob = head.output if len(net.output_blobs) > 1 else net.output_blob
        outputs.append({**models.head_metadata(head), "name": name, "size": net.output_size(blob)})
    meta = {"net": entry.name, "task": "+".join(entry.tasks), "outputs": outputs}
    if len(outputs) == 1:
        only = outputs[0]
        meta.update(task=only["task"], labels=only["labels"], output={"name": only["name"], "classes": only["size"]})
        meta.update({key: only[key] for key in ("age_bin_edges", "age_bin_centres") if key in only})
    return meta


def metadata(entry: models.Model, net: CaffeNet, precision: str, mean_file, mean_image_size, extra=None) -> dict:
    ov = _ov()
    paths = ir_paths(".", entry.name, precision)
    meta = {
        "format": "agegender-edge-kit IR metadata",
        "version": METADATA_VERSION,
        **model_metadata(entry, net),
        "precision": precision,
        "input": {"name": INPUT_NAME, "shape": [1, net.size, net.size, 3], "layout": INPUT_LAYOUT,
                  "element_type": "u8", "colour_order": COLOUR_ORDER,
                  "preprocessing": "baked into the IR: u8 -> f32, NHWC -> NCHW, minus the mean crop"},
        # How the training images were framed: the face chip resized to training_size, then the
        # centre input-size crop (Caffe's test-phase transform).
        "training_size": int(mean_image_size),
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
    """Heads and labels in the IR's rt_info too, for tools that read only the XML."""
    model.set_rt_info(meta["task"], ["agegender", "task"])
    for output in meta["outputs"]:
        labels = " ".join(label.replace(" ", "_") for label in output.get("labels", []))
        model.set_rt_info(f"{output['task']}: {labels}".strip(": "), ["agegender", "outputs", output["name"]])
    if "labels" in meta:
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


def lmdb_path(data_dir, family: str, split: str, suffix: str = "") -> Path:
    return Path(data_dir) / "lmdb" / f"{family}_{split}{suffix}_lmdb"


def check_images(data_dir, family: str, size: int, count: int = CHECK_IMAGES):
    """Images for the numerical check: test-LMDB centre crops when the dataset exists, else generated ones."""
    path = lmdb_path(data_dir, family, "test")
    if (path / "data.mdb").is_file():
        images, _ = lmdb_images(path, size, count)
        return images, f"{len(images)} images of {path}"
    return generated_images(size, count), f"{count} generated images (no test LMDB at {path})"


def compile_precision(net: CaffeNet, entry: models.Model, precision: str, mean_file, ir_root, images,
                      images_source) -> dict:
    """Build, write and check one FP16 or FP32 IR; returns its metadata (with the measured difference)."""
    mean_image = formats.read_mean(mean_file)
    mean = mean_crop(mean_image, net.size, str(mean_file))
    model = build_model(net, mean, fp16_weights=precision == "FP16")
    meta = metadata(entry, net, precision, mean_file, mean_image.shape[1])
    set_rt_labels(model, meta)
    problem = opencv_reference_problem(net)
    reference = None if problem else opencv_outputs(net, mean, images)
    folder = ir_paths(ir_root, entry.name, precision)["folder"]

    def check(paths):
        if problem:
            return {"check": {"skipped": problem}}
        # f32 inference precision for both: on CPUs with bf16 OpenVINO would otherwise round
        # activations, and the check is about the IR, not about the device's arithmetic.
        diff = output_difference(ir_outputs(compile_for_cpu(paths["xml"], "f32"), images), reference)
        if diff > TOLERANCE[precision]:
            raise KitError(f"{folder}: IR and OpenCV's Caffe importer differ by {diff:.3g} in probability "
                           f"(allowed {TOLERANCE[precision]:g}) on {images_source}")
        # For information: the CPU's own default precision (bf16 where the CPU has it), closer to
        # what reduced-precision devices such as the NCS2 (fp16 arithmetic) do to activations.
        default = ir_outputs(compile_for_cpu(paths["xml"], None), images)
        return {"check": {"reference": f"OpenCV {_cv2_version()} Caffe importer", "images": images_source,
                          "outputs": list(reference), "max_prob_difference": diff,
                          "tolerance": TOLERANCE[precision], "inference_precision": "f32",
                          "max_prob_difference_cpu_default_precision": output_difference(default, reference)}}

    return write_ir(model, net, mean, folder, meta, check)


def _cv2_version() -> str:
    import cv2
    return cv2.__version__


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def lmdb_labels(path, count: int) -> np.ndarray:
    from caffekit.lmdb_data import LmdbSource

    source = LmdbSource(path)
    try:
        return np.array([source.datum(i).label for i in range(count)])
    finally:
        source.close()


def head_labels(entry: models.Model, data_dir, test_labels: np.ndarray) -> Dict[str, np.ndarray]:
    """The true class of each test image for every classification head, by IR output name."""
    if entry.key != "joint":
        return {OUTPUT_NAME: test_labels}
    genders = lmdb_labels(lmdb_path(data_dir, entry.data, "test", "_gender"), len(test_labels))
    return {"age_bins": np.array([tasks.age_to_bin(int(age)) for age in test_labels]), "gender": genders}


CALIBRATION_IMAGES = 300


def quantize_int8(net: CaffeNet, entry: models.Model, mean_file, ir_root, data_dir,
                  calibration_count: int = CALIBRATION_IMAGES, progress=print) -> dict:
    """INT8 IR by NNCF post-training quantization, calibrated on train images; reports each head's test
    accuracy against the FP32 model (both on CPU, FP32 at f32 precision)."""
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    mean_image = formats.read_mean(mean_file)
    mean = mean_crop(mean_image, net.size, str(mean_file))
    calibration, _ = lmdb_images(lmdb_path(data_dir, entry.data, "train"), net.size, calibration_count, seed=1)
    test_images, test_labels = lmdb_images(lmdb_path(data_dir, entry.data, "test"), net.size)
    truth = head_labels(entry, data_dir, test_labels)
    model = build_model(net, mean)
    fp32 = ir_outputs(compile_for_cpu(model, "f32"), test_images)
    progress(f"{entry.name}: quantizing on {len(calibration)} train images")
    quantized = nncf.quantize(model, nncf.Dataset(calibration, lambda image: image[np.newaxis]),
                              subset_size=len(calibration))
    meta = metadata(entry, net, "INT8", mean_file, mean_image.shape[1])
    set_rt_labels(quantized, meta)
    folder = ir_paths(ir_root, entry.name, "INT8")["folder"]

    def check(paths):
        int8 = ir_outputs(compile_for_cpu(paths["xml"], None), test_images)
        heads = {}
        for name, labels in truth.items():
            fp32_acc, int8_acc = accuracy(fp32[name], labels), accuracy(int8[name], labels)
            heads[name] = {"fp32_accuracy": fp32_acc, "int8_accuracy": int8_acc,
                           "accuracy_loss_points": 100 * (fp32_acc - int8_acc),
                           "agreement_with_fp32": float(np.mean(fp32[name].argmax(1) == int8[name].argmax(1)))}
        first = heads[next(iter(heads))]
        return {"int8": {"method": f"NNCF {nncf.__version__} post-training quantization",
                         "calibration_images": len(calibration),
                         "calibration_source": str(lmdb_path(data_dir, entry.data, "train")),
                         "test_images": len(test_images), **first, "heads": heads,
                         "max_prob_difference": output_difference(fp32, int8)}}

    return write_ir(quantized, net, mean, folder, meta, check)
