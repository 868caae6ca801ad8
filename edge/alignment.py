"""Faces warped into the framing of a UTKFace chip, the way the classifiers saw them in training.

UTKFace chips are faces rotated upright by their landmarks and cropped to a fixed framing. The
detector's eye and mouth keypoints on a face in the wild give one similarity transform (rotation,
scale, shift) onto where those keypoints sit in a chip; warping with it gives the chip the face
would have had. Where they sit was measured on UTKFace itself, with the detector the runner uses:

    python edge/alignment.py --measure ../shared/data/utkface --list data/pretrain/splits/train.txt

runs BlazeFace (short range) on chips of the train split, each padded with grey so a face touching
the border is still found, and takes the median position of each keypoint in units of the chip
side (CHIP_TEMPLATE below; `make detector` writes it into face_detector.json beside the model, and
the runner reads it there). The same run measures, for boxes without keypoints, the chip side over
the box side and the chip centre's shift below the box centre (the unaligned BlazeFace framing).
"""
import numpy as np
import cv2

ALIGN_KEYPOINTS = ("right_eye", "left_eye", "mouth_centre")  # the steadiest three; ears vanish in profile
CHIP_SIDE = 200  # pixels of a UTKFace chip

# Measured (see above): 1,000 chips of data/pretrain/splits/train.txt (all races), shuffled with seed 0,
# 200 px chips padded by 100 px; BlazeFace short range found a face on 999 of them. Eyes sit at 30% of
# the chip's height, the mouth at 72%; the box is a little smaller than the chip (1.08).
CHIP_TEMPLATE = {
    "keypoints": {"right_eye": [0.3, 0.3032], "left_eye": [0.693, 0.2996], "nose_tip": [0.5009, 0.5236],
                  "mouth_centre": [0.5006, 0.7155], "right_ear_tragion": [0.0818, 0.395],
                  "left_ear_tragion": [0.8999, 0.3911]},
    "box_scale": 1.0811, "box_shift_y": -0.0191,
    "measured_on": "999 UTKFace chips with a face of 1000 tried (data/pretrain/splits/train.txt, seed 0)",
}


def similarity(source, target):
    """The 2 x 3 similarity (rotation, uniform scale, shift; no reflection) that maps the points
    ``source`` (N, 2) onto ``target`` (N, 2) with least squares. As complex numbers the map is
    z -> k z + t, so the least-squares k has a closed form."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    a = (source - source_mean).dot([1, 1j])
    b = (target - target_mean).dot([1, 1j])
    k = np.vdot(a, b) / max(np.vdot(a, a).real, 1e-12)  # vdot conjugates its first argument
    shift = target_mean - np.array([[k.real, -k.imag], [k.imag, k.real]]).dot(source_mean)
    return np.array([[k.real, -k.imag, shift[0]], [k.imag, k.real, shift[1]]])


def template_points(template, names):
    """(N, 2) chip-relative positions of ``names`` from a template dict {"keypoints": {name: [x, y]}}."""
    return np.array([template["keypoints"][name] for name in names], np.float64)


def chip_matrix(keypoints, keypoint_names, template):
    """The 2 x 3 similarity from frame pixels into a CHIP_SIDE chip, by the eyes and the mouth."""
    index = [list(keypoint_names).index(name) for name in ALIGN_KEYPOINTS]
    return similarity(np.asarray(keypoints)[index], template_points(template, ALIGN_KEYPOINTS) * CHIP_SIDE)


# The second look (refine_keypoints): the face warped upright into the view the template was measured in, a
# chip padded by TEMPLATE_PAD on every side, so the detector sees it at the size and angle of the template's chips.
TEMPLATE_PAD = 100


def refine_keypoints(frame, keypoints, keypoint_names, template, candidates, size):
    """Keypoints of the face again, from ``candidates`` (a BlazeFace's: view -> (boxes, keypoints, scores))
    run on the face warped upright into the template's view at the detector's ``size``: a small or tilted
    face then looks to the detector as the chips did when the template was measured. The first keypoints
    where the second look finds no face near the centre."""
    view = CHIP_SIDE + 2 * TEMPLATE_PAD
    matrix = chip_matrix(keypoints, keypoint_names, template)
    matrix[:, 2] += TEMPLATE_PAD
    upright = cv2.warpAffine(frame, matrix, (view, view), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
    upright = cv2.resize(upright, (size, size), interpolation=cv2.INTER_AREA)
    boxes, points, scores = candidates(upright)
    if not len(scores):
        return keypoints
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0 * (float(view) / size)
    near = np.hypot(*(centres - view / 2.0).T) < CHIP_SIDE / 4.0
    if not near.any():
        return keypoints
    weights = np.where(near, scores, 0.0)
    best = (points * weights[:, np.newaxis, np.newaxis]).sum(0) / weights.sum() * (float(view) / size)
    inverse = cv2.invertAffineTransform(matrix)
    return best.dot(inverse[:, :2].T) + inverse[:, 2]


def aligned_chip(frame, keypoints, keypoint_names, template, side):
    """The ``side`` x ``side`` chip of one face: ``keypoints`` (frame pixels, ordered as ``keypoint_names``)
    warped onto the template's in a chip of UTKFace's own CHIP_SIDE pixels, then resized to ``side`` as the
    dataset stage resized the chips (bilinear): the nets learned that resampling's look, aliasing and all,
    and a warp straight to 72 pixels looks different. Outside the frame is black, as at the edges of
    UTKFace chips cut from photos."""
    matrix = chip_matrix(keypoints, keypoint_names, template)
    chip = cv2.warpAffine(frame, matrix, (CHIP_SIDE, CHIP_SIDE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return chip if side == CHIP_SIDE else cv2.resize(chip, (side, side), interpolation=cv2.INTER_LINEAR)


def measure_template(paths, detector, pad=100):
    """The chip template from UTKFace chips at ``paths``: the median keypoint positions (units of the chip
    side) and, for the unaligned framing, the median chip side / box side and chip-centre shift below the
    box centre (units of the box side). Returns (template dict, chips with a face, chips tried)."""
    positions, ratios, shifts = [], [], []
    tried = 0
    for path in paths:
        chip = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if chip is None:
            continue
        tried += 1
        side = chip.shape[0]
        padded = cv2.copyMakeBorder(chip, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
        faces = [face for face in detector.detect(padded) if face.keypoints is not None]
        if not faces:
            continue
        face = max(faces, key=lambda f: f.score)
        positions.append((face.keypoints - pad) / float(side))
        x, y, w, h = face.box
        ratios.append(float(side) / w)
        shifts.append((pad + side / 2.0 - (y + h / 2.0)) / h)
    if not positions:
        return None, 0, tried
    median = np.median(np.stack(positions), axis=0)
    template = {"keypoints": dict((name, [round(float(x), 4), round(float(y), 4)])
                                  for name, (x, y) in zip(detector.keypoint_names, median)),
                "box_scale": round(float(np.median(ratios)), 4), "box_shift_y": round(float(np.median(shifts)), 4),
                "measured_on": "{} UTKFace chips with a face of {} tried".format(len(positions), tried)}
    return template, len(positions), tried


def main():
    import argparse
    import os
    import random

    from blazeface import BlazeFace, read_detector_json
    from model_files import find_models_dir

    parser = argparse.ArgumentParser(description="measure where BlazeFace's keypoints sit on UTKFace chips")
    parser.add_argument("--measure", required=True, metavar="DIR", help="a UTKFace folder (*.jpg.chip.jpg)")
    parser.add_argument("--list", metavar="FILE", help="file names to draw from, one per line (e.g. a train split)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--models", default="models/ir", help="holds face_detector/ (make detector)")
    args = parser.parse_args()
    meta = read_detector_json(find_models_dir(args.models))
    if meta is None:
        raise SystemExit("error: {}: no face detector (run `make detector`)".format(args.models))
    names = open(args.list).read().split() if args.list else sorted(
        n for n in os.listdir(args.measure) if n.endswith(".jpg"))
    random.Random(0).shuffle(names)
    template, found, tried = measure_template([os.path.join(args.measure, n) for n in names[:args.count]],
                                              BlazeFace(meta, "short_range", "opencv"))
    if template is None:
        raise SystemExit("error: {}: no face found on {} chips".format(args.measure, tried))
    import json
    print(json.dumps(template, indent=2))


if __name__ == "__main__":
    main()
