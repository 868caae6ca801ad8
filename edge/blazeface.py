"""MediaPipe's BlazeFace detector: boxes and six keypoints per face, decoded in NumPy.

The model files come from the mediapipe==0.10.14 wheel (`make detector`, scripts/build_detector.py),
which writes <models>/face_detector/ with the .tflite files, their IRs and face_detector.json: input
size, output names, anchor and decoding options, the keypoint names. Everything here reads those
facts from the JSON; the numbers below are MediaPipe's own graph options, kept there.

Pipeline per frame: letterbox the frame into the model's square input (aspect kept, black bars),
run the model (OpenVINO IR on the CPU, whose graph converts u8 BGR itself, or the .tflite through
OpenCV DNN), decode each anchor's regressors into a box and keypoints, keep scores above the
threshold, merge overlapping boxes by MediaPipe's weighted non-maximum suppression, and map back
from the letterboxed square to frame pixels.
"""
import collections
import json
import math
import os

import cv2
import numpy as np

from model_files import EdgeError

DETECTOR_FOLDER = "face_detector"
DETECTOR_JSON = "face_detector.json"
DETECTOR_FORMAT = 1
# A tiled photo gives the short-range model 15 or so looks instead of one, and as many chances of a false
# face: in a tiled photo its faces must score 0.7, not the model's 0.5. On insightface's six-person photo the six
# faces score 0.89-0.97 and the two false ones (a hand, poker chips) 0.65 and 0.53.
TILE_MIN_SCORE = 0.7

# box: (x, y, w, h) ints in frame pixels; keypoints: float array (6, 2) of (x, y) in frame pixels, or None
# (the Haar cascade gives none); score: the detector's confidence (None for Haar).
Detection = collections.namedtuple("Detection", "box score keypoints")


def ssd_anchors(strides, input_size, anchor_offset=0.5, interpolated_scale_aspect_ratio=1.0):
    """Anchor centres (N, 2) in [0, 1] of MediaPipe's SsdAnchorsCalculator with fixed_anchor_size.

    Consecutive layers with the same stride share one feature map; each layer puts one anchor
    (aspect ratio 1) per cell, plus one more when interpolated_scale_aspect_ratio > 0. With a
    fixed anchor size every anchor is 1 x 1, so only the centres matter."""
    centres = []
    layer = 0
    while layer < len(strides):
        stride, per_cell = strides[layer], 0
        while layer < len(strides) and strides[layer] == stride:
            per_cell += 2 if interpolated_scale_aspect_ratio > 0 else 1
            layer += 1
        cells = int(math.ceil(float(input_size) / stride))
        grid = (np.arange(cells, dtype=np.float32) + anchor_offset) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        cell_centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cell_centres, per_cell, axis=0))
    return np.concatenate(centres, axis=0)


def decode(regressors, scores, anchors, scale, score_clipping, min_score, num_keypoints):
    """Candidates above ``min_score``: (boxes (K, 4) as x0, y0, x1, y1, keypoints (K, n, 2), scores (K,)),
    all in the model input's normalised [0, 1] coordinates."""
    logits = np.clip(scores.reshape(-1).astype(np.float64), -score_clipping, score_clipping)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    keep = np.nonzero(probabilities >= min_score)[0]
    raw = regressors.reshape(len(anchors), -1)[keep] / float(scale)
    centres = anchors[keep]
    xy = raw[:, 0:2] + centres
    half = raw[:, 2:4] / 2.0
    boxes = np.concatenate([xy - half, xy + half], axis=1)
    keypoints = raw[:, 4:4 + 2 * num_keypoints].reshape(-1, num_keypoints, 2) + centres[:, np.newaxis, :]
    return boxes, keypoints, probabilities[keep]


def iou(box, boxes):
    """Intersection over union of one box (x0, y0, x1, y1) with each of ``boxes``."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def weighted_nms(boxes, keypoints, scores, iou_threshold):
    """MediaPipe's WEIGHTED non-maximum suppression: the best remaining candidate and every one
    overlapping it by more than ``iou_threshold`` become one face whose box and keypoints are their
    score-weighted mean (steadier than keeping the best alone), with the best one's score."""
    order = np.argsort(-scores, kind="stable")
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.ones(len(scores), bool)
    merged = []
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        group = remaining & (iou(boxes[i], boxes) > iou_threshold)
        group[i] = True
        weights = scores[group][:, np.newaxis]
        merged.append(((boxes[group] * weights).sum(0) / weights.sum(),
                       (keypoints[group] * weights[:, :, np.newaxis]).sum(0) / weights.sum(),
                       float(scores[i])))
        remaining &= ~group
    return merged


def letterbox(frame, size):
    """The frame in a ``size`` square, aspect kept, centred between black bars; and (scale, pad_x, pad_y)
    to map square pixels back: frame = (square - pad) / scale."""
    height, width = frame.shape[:2]
    scale = float(size) / max(height, width)
    new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (new_w, new_h), interpolation=interpolation)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    square = cv2.copyMakeBorder(resized, pad_y, size - new_h - pad_y, pad_x, size - new_w - pad_x,
                                cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return square, (scale, pad_x, pad_y)


def missing(path):
    if not os.path.isfile(path):
        raise EdgeError("{}: missing (copy models/ir/face_detector/ whole, or rebuild it with `make detector`)"
                        .format(path))


def read_detector_json(models_dir):
    """The detector's JSON as a dict, or None when no detector was built into ``models_dir``."""
    path = os.path.join(models_dir, DETECTOR_FOLDER, DETECTOR_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as stream:
            meta = json.load(stream)
    except (OSError, ValueError) as exc:
        raise EdgeError("{}: cannot read the detector's metadata ({})".format(path, exc))
    if not isinstance(meta, dict) or meta.get("format") != DETECTOR_FORMAT or not isinstance(meta.get("models"), dict):
        raise EdgeError("{}: not a face detector file of this kit (rebuild with `make detector`)".format(path))
    meta["path"] = path
    return meta


class BlazeFace(object):
    """Faces with keypoints in a frame: ``detect(frame)`` -> [Detection], best first.

    ``engine``: "openvino" runs the IR on the CPU (detection stays on the CPU while the stick runs
    the classifiers), "opencv" runs the .tflite through OpenCV DNN."""

    def __init__(self, meta, variant, engine, openvino=None, precision="FP32"):
        if variant not in meta["models"]:
            raise EdgeError("{}: no detector {!r} (present: {})".format(meta["path"], variant,
                                                                         ", ".join(sorted(meta["models"]))))
        self.meta = meta
        self.variant = variant
        model = meta["models"][variant]
        folder = os.path.dirname(meta["path"])
        try:
            self.size = int(model["input_size"])
            anchors, decoding = model["anchors"], model["decode"]
            self.anchors = ssd_anchors(anchors["strides"], self.size, anchors["anchor_offset"],
                                       anchors["interpolated_scale_aspect_ratio"])
            if len(self.anchors) != anchors["count"]:
                raise EdgeError("{}: {} anchors from the options, the file says {}".format(
                    meta["path"], len(self.anchors), anchors["count"]))
            self.scale, self.clipping = float(decoding["scale"]), float(decoding["score_clipping"])
            self.min_score, self.num_keypoints = float(decoding["min_score"]), int(decoding["num_keypoints"])
            self.iou = float(model["nms"]["iou"])
            self.output_names = (model["outputs"]["regressors"], model["outputs"]["scores"])
            self.keypoint_names = list(meta["keypoints"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeError("{}: damaged detector metadata ({}: {})".format(meta["path"], type(exc).__name__, exc))
        self.engine = engine
        if engine == "openvino":
            self._run = self._openvino_runner(folder, model, openvino, precision)
        else:
            self._run = self._opencv_runner(folder, model)

    def _openvino_runner(self, folder, model, openvino, precision):
        Core = openvino[0]
        xml = os.path.join(folder, model["ir"][precision])
        missing(xml)
        missing(os.path.splitext(xml)[0] + ".bin")
        core = Core()
        try:
            compiled = core.compile_model(core.read_model(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        except RuntimeError as exc:
            raise EdgeError("{}: cannot load the detector ({})".format(xml, str(exc).strip().splitlines()[-1]))
        request = compiled.create_infer_request()
        ports = [compiled.output(name) for name in self.output_names]

        def run(square_bgr):
            request.infer({0: square_bgr[np.newaxis]})
            return [np.array(request.get_tensor(port).data) for port in ports]
        return run

    def _opencv_runner(self, folder, model):
        path = os.path.join(folder, model["tflite"])
        missing(path)
        if not hasattr(cv2.dnn, "readNetFromTFLite"):
            raise EdgeError("OpenCV {} cannot read TFLite models (4.8 or newer can): use --detector haar"
                            .format(cv2.__version__))
        try:
            net = cv2.dnn.readNetFromTFLite(path)
        except cv2.error as exc:
            raise EdgeError("{}: OpenCV cannot load the detector ({})".format(path, str(exc).strip()[:200]))

        def run(square_bgr):
            # The .tflite wants RGB in [-1, 1]; OpenCV's importer takes NCHW blobs.
            blob = cv2.dnn.blobFromImage(square_bgr, 1.0 / 127.5, mean=(127.5, 127.5, 127.5), swapRB=True)
            net.setInput(blob)
            return net.forward(list(self.output_names))
        return run

    def candidates(self, frame):
        """Every candidate above the threshold, before suppression: (boxes (K, 4) as x0, y0, x1, y1,
        keypoints (K, n, 2), scores (K,)) in frame pixels."""
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        square, (scale, pad_x, pad_y) = letterbox(frame, self.size)
        regressors, scores = self._run(np.ascontiguousarray(square))
        boxes, keypoints, probabilities = decode(regressors, scores, self.anchors, self.scale, self.clipping,
                                                 self.min_score, self.num_keypoints)
        boxes = (boxes * self.size - [pad_x, pad_y, pad_x, pad_y]) / scale
        keypoints = (keypoints * self.size - [pad_x, pad_y]) / scale
        return boxes, keypoints, probabilities

    def detect(self, frame):
        return detections(weighted_nms(*self.candidates(frame), iou_threshold=self.iou), frame.shape)


def detections(merged, frame_shape):
    """[Detection] from weighted_nms's output in frame pixels, boxes clipped to the frame."""
    faces = []
    height, width = frame_shape[:2]
    for (x0, y0, x1, y1), points, score in merged:
        x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
        x1, y1 = min(width, int(round(x1))), min(height, int(round(y1)))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            faces.append(Detection((x0, y0, x1 - x0, y1 - y0), score, points))
    return faces


def tiles(width, height, side, overlap=0.5):
    """Square tiles (x, y, side) covering the frame, each overlapping the next by ``overlap`` of a side,
    so that every face up to ``overlap * side`` wide lies whole inside one of them."""
    def starts(length):
        if length <= side:
            return [0]
        count = int(math.ceil((length - side) / (side * (1 - overlap)))) + 1
        return [int(round(i * (length - side) / (count - 1))) for i in range(count)]
    return [(x, y, side) for y in starts(height) for x in starts(width)]


class TiledBlazeFace(object):
    """Faces of every size in a photo: the full-range model on the whole photo (where OpenVINO runs it),
    and the short-range model on the whole photo and on overlapping tiles of half its shorter side, where a
    face of a group photo becomes as large as the short-range model expects. Short-range candidates
    touching a tile's inner edge are dropped (the face is whole in a neighbouring tile); the rest are
    merged by one weighted suppression."""

    def __init__(self, full, short):
        self.full, self.short = full, short  # full: None without OpenVINO
        self.keypoint_names, self.iou = short.keypoint_names, short.iou

    def detect(self, frame):
        height, width = frame.shape[:2]
        parts = [self.full.candidates(frame)] if self.full is not None else []
        side = min(height, width) // 2
        windows = [(0, 0, width, height)]
        if side >= 2 * self.short.size:  # smaller photos: the whole-frame passes see their faces large enough
            windows += [(x, y, side, side) for x, y, _ in tiles(width, height, side)]
        for x, y, w, h in windows:
            boxes, keypoints, scores = self.short.candidates(frame[y:y + h, x:x + w])
            margin = 2.0
            keep = ((boxes[:, 0] > margin) | (x == 0)) & ((boxes[:, 1] > margin) | (y == 0)) & \
                   ((boxes[:, 2] < w - margin) | (x + w >= width)) & \
                   ((boxes[:, 3] < h - margin) | (y + h >= height)) & (scores >= TILE_MIN_SCORE)
            parts.append((boxes[keep] + [x, y, x, y], keypoints[keep] + [x, y], scores[keep]))
        boxes, keypoints, scores = (np.concatenate(arrays) for arrays in zip(*parts))
        return detections(weighted_nms(boxes, keypoints, scores, self.iou), frame.shape)
