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
"""
import os

import cv2
import numpy as np

CASCADE_NAME = "haarcascade_frontalface_default.xml"
# pip wheels ship the cascades as cv2.data; Debian's python3-opencv (apt, e.g. on a Pi) puts them here.
CASCADE_FOLDERS = [getattr(getattr(cv2, "data", None), "haarcascades", ""), "/usr/share/opencv4/haarcascades",
                   "/usr/share/opencv/haarcascades", "/usr/local/share/opencv4/haarcascades"]
CHIP_SCALE = 0.98     # UTKFace chip side / Haar box side (measured, see above)
CHIP_SHIFT_Y = 0.08   # (chip centre - box centre) / box side, downwards (measured)
DETECT_WIDTH = 320    # detection runs on a copy this wide (or the frame, if narrower)
MIN_FACE = 30         # smallest face searched for, in pixels of the detection copy (60 px at 640 wide)
SCALE_STEP = 1.15     # cascade pyramid step: 1.1 finds a few more faces at nearly twice the cost


def cascade_path():
    for folder in CASCADE_FOLDERS:
        path = os.path.join(folder, CASCADE_NAME)
        if folder and os.path.isfile(path):
            return path
    return None


class FaceDetector(object):
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


def net_input(frame, chip, size, training_size):
    """The chip as the net's input, framed as in training: resized to ``training_size`` (the LMDB images'
    size, from the IR's JSON), then the centre ``size`` crop (u8 BGR HWC)."""
    x, y, w, h = chip
    crop = frame[y:y + h, x:x + w]
    if crop.ndim == 2:
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    resized = cv2.resize(crop, (training_size, training_size), interpolation=cv2.INTER_LINEAR)
    offset = (training_size - size) // 2
    return np.ascontiguousarray(resized[offset:offset + size, offset:offset + size])


def measure_framing(paths, pad=100):
    """Median chip/box size ratio and centre shift of the cascade on UTKFace chips.

    Each chip is padded with grey so a face touching the chip's border is still found.
    Returns (ratio, shift_y, boxes found, chips tried).
    """
    detector = FaceDetector(detect_width=10 ** 6, min_face=40)
    ratios, shifts = [], []
    for path in paths:
        chip = cv2.imread(str(path))
        if chip is None:
            continue
        side = chip.shape[0]
        padded = cv2.copyMakeBorder(chip, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
        boxes = detector.detect(padded)
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
