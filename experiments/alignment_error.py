"""How far the runner's alignment lands from a chip's own framing, measured on faces whose true framing is known.

Each chip of a split is pasted into a frame exactly as `scripts/robustness.py` pastes the test faces (rotated up
to +-30 degrees, scaled 0.5x-2x, a varied background). BlazeFace finds it, and the runner's similarity transform
(eyes and mouth onto the chip template) cuts it out again. Composed with the known paste, that transform maps the
chip onto itself: the identity where alignment is perfect. Its rotation, log scale and the shift of the chip's
centre (in chip sides) are the alignment error; this prints their spread overall and by |angle| and scale, for the
short-range and tiled detectors, each with and without the runner's second look (alignment.refine_keypoints). The
figures set dataset/augment.py's WILD_JITTER (the wild copies' error).

    python experiments/alignment_error.py --split data/splits/train.txt --limit 600
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "edge")]

import engines  # noqa: E402
import robustness  # noqa: E402
from alignment import CHIP_SIDE, chip_matrix  # noqa: E402
from face_detection import load_detector  # noqa: E402


def residual(keypoints, framing, centre, angle, scale):
    """(degrees, log scale, centre shift in chip sides) of the alignment composed with the known paste."""
    align = chip_matrix(keypoints, framing.keypoint_names, framing.template)
    paste = robustness.paste_matrix(centre, angle, scale)
    both = np.vstack([align, [0, 0, 1]]).dot(np.vstack([paste, [0, 0, 1]]))[:2]
    k = complex(both[0, 0], both[1, 0])
    mid = np.array([CHIP_SIDE / 2.0, CHIP_SIDE / 2.0, 1.0])
    shift = (both.dot(mid) - mid[:2]) / CHIP_SIDE
    return np.degrees(np.angle(k)), np.log(abs(k)), shift


def spread(rows):
    rows = np.asarray(rows)
    if not len(rows):
        return {"faces": 0}
    return {"faces": len(rows),
            "degrees_sd": round(float(rows[:, 0].std()), 2), "degrees_mean": round(float(rows[:, 0].mean()), 2),
            "log_scale_sd": round(float(rows[:, 1].std()), 4), "log_scale_mean": round(float(rows[:, 1].mean()), 4),
            "shift_x_sd": round(float(rows[:, 2].std()), 4), "shift_y_sd": round(float(rows[:, 3].std()), 4),
            "shift_y_mean": round(float(rows[:, 3].mean()), 4),
            "p90_degrees": round(float(np.percentile(np.abs(rows[:, 0]), 90)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, default=REPO / "data" / "splits" / "train.txt")
    parser.add_argument("--utkface", type=Path, default=REPO.parent / "shared" / "data" / "utkface")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    names = args.split.read_text().split()
    names = [names[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(names))[:args.limit])]
    chips, frames = robustness.build_set(args.utkface, names, args.seed)
    openvino = engines.import_openvino()
    report = {}
    for variant in ("short", "short, second look", "tiled", "tiled, second look"):
        detector = load_detector(str(args.models_dir / "ir"), "blazeface", variant.split(",")[0], False, openvino,
                                 refine=variant.endswith("second look"))
        rows, by_angle, by_scale = [], {}, {}
        for frame, centre, side, angle, scale in frames:
            near = [(np.hypot(d.box[0] + d.box[2] / 2.0 - centre[0], d.box[1] + d.box[3] / 2.0 - centre[1]), d)
                    for d in detector.detect(frame) if d.keypoints is not None]
            near = [(dist, d) for dist, d in near if dist <= robustness.FOUND_RADIUS * side]
            if not near:
                continue
            keypoints = min(near, key=lambda pair: pair[0])[1].keypoints
            degrees, log_scale, shift = residual(keypoints, detector.framing, centre, angle, scale)
            row = (degrees, log_scale, shift[0], shift[1])
            rows.append(row)
            by_angle.setdefault(robustness.ANGLE_NAMES[robustness.bucket_of(abs(angle), robustness.ANGLE_EDGES)],
                                []).append(row)
            by_scale.setdefault(robustness.SCALE_NAMES[robustness.bucket_of(scale, robustness.SCALE_EDGES)],
                                []).append(row)
        report[variant] = {"all": spread(rows),
                           "by_angle": {name: spread(by_angle.get(name, [])) for name in robustness.ANGLE_NAMES},
                           "by_scale": {name: spread(by_scale.get(name, [])) for name in robustness.SCALE_NAMES}}
    print(json.dumps({"split": str(args.split), "faces": len(names), "seed": args.seed, "error": report}, indent=1))


if __name__ == "__main__":
    main()
