"""Faces in a frame, framed the way the nets saw them in training.

Detection: OpenCV's bundled Haar cascade (haarcascade_frontalface_default.xml, no download).
It runs on a grey copy scaled down to DETECT_WIDTH pixels wide: at 640x480 the full-size
cascade alone takes longer than a frame at 30 FPS, and faces smaller than MIN_FACE pixels at
that scale (60 px in a 640x480 frame) are too small for a 227x227 classifier anyway.

Framing: the nets were trained on UTKFace chips (aligned 200x200 crops) resized to 256x256,
then the centre 227x227 (Caffe's test-phase crop). A Haar box is not a UTKFace chip, so each
box is turned into the chip it most likely corresponds to. Measured by running this cascade
on UTKFace chips (``python edge/face_detection.py --measure UTKFACE_DIR``; 600 random chips,
seed 0, the runner's pyramid step; 559 had a face): the chip side is CHIP_SCALE = 0.98 times
the box side (median; quartiles about 0.93-1.04) and the chip centre lies CHIP_SHIFT_Y = 0.08
box sides below the box centre (the cascade box sits high, on eyes and brow). So the
"enlargement" is about 1x: UTKFace chips are framed as tightly as Haar boxes. The chip is
clipped to the frame, resized to 256x256 with the same interpolation as the dataset stage
(bilinear), and its centre 227x227 crop is what the nets classify, exactly as in training;
``--no-detect`` does the same with the whole image as the chip.

BlazeFace (edge/blazeface.py, the default once `make detector` has built it) gives keypoints too:
each face is then warped into the chip framing by its eyes and mouth (edge/alignment.py), or, with
--no-align, framed from its box with BlazeFace's own measured chip scale and shift. Haar stays as
the fallback when no detector was built, and on request (--detector haar).
"""
import collections
import os

import cv2
import numpy as np

from alignment import aligned_chip, refine_keypoints
from blazeface import BlazeFace, Detection, TiledBlazeFace, read_detector_json
from model_files import EdgeError

CASCADE_NAME = "haarcascade_frontalface_default.xml"
# pip wheels ship the cascades as cv2.data; Debian's python3-opencv (apt, e.g. on a Pi) puts them here.
CASCADE_FOLDERS = [getattr(getattr(cv2, "data", None), "haarcascades", ""), "/usr/share/opencv4/haarcascades",
                   "/usr/share/opencv/haarcascades", "/usr/local/share/opencv4/haarcascades"]
CHIP_SCALE = 0.98     # UTKFace chip side / Haar box side (measured, see above)
CHIP_SHIFT_Y = 0.08   # (chip centre - box centre) / box side, downwards (measured)
DETECT_WIDTH = 320    # detection runs on a copy this wide (or the frame, if narrower)
MIN_FACE = 30         # smallest face searched for, in pixels of the detection copy (60 px at 640 wide)
SCALE_STEP = 1.15     # cascade pyramid step: 1.1 finds a few more faces at nearly twice the cost
DETECTORS = ("auto", "blazeface", "haar")
# BlazeFace: short range (faces within ~2 m), full range (groups, rooms), tiled (both on the whole photo, and
# short range on tiles: photos with faces of any size)
RANGES = ("auto", "short", "full", "tiled")

# How a detection becomes a chip: from its box (scale, shift_y as for Haar above), or, when ``template``
# is given and the detection has keypoints (named ``keypoint_names``), by alignment onto the template's.
Framing = collections.namedtuple("Framing", "scale shift_y template keypoint_names")
HAAR_FRAMING = Framing(CHIP_SCALE, CHIP_SHIFT_Y, None, None)


def cascade_path():
    for folder in CASCADE_FOLDERS:
        path = os.path.join(folder, CASCADE_NAME)
        if folder and os.path.isfile(path):
            return path
    return None


class HaarDetector(object):
    name = "Haar cascade"
    framing = HAAR_FRAMING

    def __init__(self, detect_width=DETECT_WIDTH, min_face=MIN_FACE, scale_step=SCALE_STEP):
        path = cascade_path()
        self.cascade = cv2.CascadeClassifier(path) if path else None
        if self.cascade is None or self.cascade.empty():
            raise RuntimeError("OpenCV's Haar cascade {} not found in {}".format(
                CASCADE_NAME, ", ".join(f for f in CASCADE_FOLDERS if f)))
        self.detect_width = detect_width
        self.min_face = min_face
        self.scale_step = scale_step

    def detect(self, frame):
        """[Detection] in frame pixels, largest first (no keypoints, no score)."""
        return [Detection(box, None, None) for box in self.boxes(frame)]

    def boxes(self, frame):
        """Face boxes (x, y, w, h) in frame pixels, largest first."""
        height, width = frame.shape[:2]
        scale = min(1.0, float(self.detect_width) / width)
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        if scale < 1.0:
            grey = cv2.resize(grey, (int(round(width * scale)), int(round(height * scale))),
                              interpolation=cv2.INTER_AREA)
        found = self.cascade.detectMultiScale(grey, scaleFactor=self.scale_step, minNeighbors=5,
                                              minSize=(self.min_face, self.min_face))
        boxes = [tuple(int(round(v / scale)) for v in box) for box in found]
        return sorted(boxes, key=lambda b: -b[2] * b[3])


def chip_box(box, frame_shape, scale=CHIP_SCALE, shift_y=CHIP_SHIFT_Y):
    """The UTKFace-like chip around a detected box, clipped to the frame: (x, y, w, h)."""
    x, y, w, h = box
    side = scale * max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0 + shift_y * h
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    right, bottom = int(round(cx + side / 2)), int(round(cy + side / 2))
    height, width = frame_shape[:2]
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, width), min(bottom, height)
    return left, top, max(right - left, 1), max(bottom - top, 1)


class FramedDetector(object):
    """A BlazeFace detector (one model, or tiled) with the chip framing measured for it. Where it aligns and
    ``refine`` (a short-range BlazeFace) is given, each face's keypoints come from a second look at the face
    warped upright into the template's own view (alignment.refine_keypoints): on faces pasted into frames
    at known angles (experiments/alignment_error.py) it halves the alignment's error on small faces."""

    def __init__(self, detector, framing, name, refine=None):
        self.detector, self.framing, self.name = detector, framing, name
        self.refine = refine if framing.template is not None else None

    def detect(self, frame):
        faces = self.detector.detect(frame)
        if self.refine is None:
            return faces
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return [face._replace(keypoints=refine_keypoints(frame, face.keypoints, self.framing.keypoint_names,
                                                         self.framing.template, self.refine.candidates,
                                                         self.refine.size))
                if face.keypoints is not None else face for face in faces]


def load_detector(models_dir, choice="auto", range_choice="auto", stream=False, openvino=None, align=True,
                  refine=True):
    """The face detector the runner uses: BlazeFace when built into ``models_dir`` (``make detector``),
    else the Haar cascade; ``choice`` "haar" or "blazeface" insists. Range "auto": short range for
    video and camera (2 ms a frame), "tiled" for photos (faces of any size: both models on the whole photo,
    7 ms, plus 2 ms a tile on large photos). "full" is the full-range model alone. OpenCV cannot read the
    full-range model's sparse weights: without OpenVINO, "tiled" runs the short-range model only."""
    if choice == "haar":
        return HaarDetector()
    meta = read_detector_json(models_dir)
    if meta is None:
        if choice == "blazeface":
            raise EdgeError("{}: no face detector built (run `make detector`, or use --detector haar)".format(
                os.path.join(models_dir, "face_detector")))
        return HaarDetector()
    engine = "openvino" if openvino is not None else "opencv"
    if range_choice == "auto":
        range_choice = "short" if stream else "tiled"
    if range_choice == "full" and engine == "opencv":
        raise EdgeError("the full-range detector needs OpenVINO (OpenCV cannot read its sparse weights): "
                        "use --range short or tiled")
    template = meta.get("chip_template")
    if not isinstance(template, dict) or "keypoints" not in template:
        raise EdgeError("{}: no chip template (rebuild with `make detector`)".format(meta["path"]))
    short = BlazeFace(meta, "short_range", engine, openvino)
    framing = Framing(template["box_scale"], template["box_shift_y"], template if align else None,
                      short.keypoint_names)
    if range_choice == "short":
        detector = short
    else:
        full = BlazeFace(meta, "full_range", engine, openvino) if engine == "openvino" else None
        detector = full if range_choice == "full" else TiledBlazeFace(full, short)
    name = "BlazeFace {} range ({}), {}".format(range_choice, "OpenVINO CPU" if engine == "openvino" else
                                                "OpenCV tflite", "aligned" if align else "box framing")
    return FramedDetector(detector, framing, name + (", second look" if align and refine else ""),
                          short if refine else None)


def face_chip(frame, detection, side, framing):
    """The face as a ``side`` x ``side`` UTKFace-like chip (u8 BGR): aligned by its keypoints when the
    framing has a template and the detection keypoints, else cut around its box."""
    if framing.template is not None and detection.keypoints is not None:
        return aligned_chip(frame, detection.keypoints, framing.keypoint_names, framing.template, side)
    box = chip_box(detection.box, frame.shape, framing.scale, framing.shift_y)
    return resized_chip(frame, box, side)


def resized_chip(frame, chip, side):
    """The ``chip`` box (x, y, w, h) of the frame resized to ``side`` x ``side`` as the dataset stage did."""
    x, y, w, h = chip
    crop = frame[y:y + h, x:x + w]
    if crop.ndim == 2:
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR)


def centre_crop(chip, size):
    """The centre ``size`` x ``size`` of a chip: Caffe's test-phase crop."""
    offset = (chip.shape[0] - size) // 2
    return np.ascontiguousarray(chip[offset:offset + size, offset:offset + size])


def net_input(frame, chip, size, training_size):
    """The chip as the net's input, framed as in training: resized to ``training_size`` (the LMDB images'
    size, from the IR's JSON), then the centre ``size`` crop (u8 BGR HWC)."""
    return centre_crop(resized_chip(frame, chip, training_size), size)


def measure_framing(paths, pad=100):
    """Median chip/box size ratio and centre shift of the cascade on UTKFace chips.

    Each chip is padded with grey so a face touching the chip's border is still found.
    Returns (ratio, shift_y, boxes found, chips tried).
    """
    detector = HaarDetector(detect_width=10 ** 6, min_face=40)
    ratios, shifts = [], []
    for path in paths:
        chip = cv2.imread(str(path))
        if chip is None:
            continue
        side = chip.shape[0]
        padded = cv2.copyMakeBorder(chip, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
        boxes = detector.boxes(padded)
        if not boxes:
            continue
        x, y, w, h = boxes[0]
        ratios.append(float(side) / w)
        shifts.append((pad + side / 2.0 - (y + h / 2.0)) / h)
    if not ratios:
        return None, None, 0, len(paths)
    return float(np.median(ratios)), float(np.median(shifts)), len(ratios), len(paths)


if __name__ == "__main__":
    import argparse
    import glob
    import random

    parser = argparse.ArgumentParser(description="measure how UTKFace chips relate to Haar boxes")
    parser.add_argument("--measure", required=True, help="a UTKFace folder (*.jpg chips)")
    parser.add_argument("--count", type=int, default=600)
    args = parser.parse_args()
    chips = sorted(glob.glob(os.path.join(args.measure, "*.jpg")))
    random.Random(0).shuffle(chips)
    ratio, shift, found, tried = measure_framing(chips[:args.count])
    if ratio is None:
        raise SystemExit("no faces found in {} chips".format(tried))
    print("chip side / box side = {:.3f}, chip centre {:.3f} box sides below the box centre "
          "({} of {} chips had a face)".format(ratio, shift, found, tried))
