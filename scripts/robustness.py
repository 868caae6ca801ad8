"""Faces in the wild, simulated: how many the runner finds and how well it classifies them, per detector.

    python scripts/robustness.py --data-dir data --models-dir models --utkface ../shared/data/utkface

The set: every face of the test split (DATA_DIR/splits/test.txt), each UTKFace chip rotated (up to
+-30 degrees), scaled (0.5x-2x, even on a log scale), and pasted at a random place into a 640x480
frame over a varied background (flat colour, gradient, blurred noise, or a mosaic of other test
chips' colours), all drawn from one seeded generator, so the set is the same on every run. A face
counts as found when a detection's centre lies within a quarter of the pasted chip's side of the
chip's centre (the nearest such detection is the one classified); other detections are false.

Rows: the chips themselves (--no-detect, the upper bound), each chip cut back out of its frame by the
inverse of its known paste (perfect alignment: what resampling alone costs), the Haar cascade, BlazeFace
(short and full range) framed from its box, and BlazeFace with alignment by eyes and mouth, from the
detection's keypoints and after the runner's second look (alignment.refine_keypoints). Accuracy is over
all faces (a face not found counts as wrong) and over the faces found, overall and by paste scale and
angle. Writes BENCH/robustness.json, .md and robustness_examples.png (the first frames with each
detector's boxes).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge")]

import engines  # noqa: E402
import run_inference  # noqa: E402
from blazeface import read_detector_json  # noqa: E402
from face_detection import HaarDetector, load_detector  # noqa: E402
from model_files import EdgeError, all_model_files  # noqa: E402

from caffekit import atomic, hardware, photos  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402
from dataset import augment  # noqa: E402

FRAME_W, FRAME_H = 640, 480
MAX_ANGLE = 30.0
SCALES = (0.5, 2.0)
CHIP_SIDE = 200  # UTKFace chips
FOUND_RADIUS = 0.25  # of the pasted chip's side


def background(rng, chips):
    kind = rng.integers(augment.BACKGROUNDS + 1)
    if kind < augment.BACKGROUNDS:
        return augment.background(rng, kind, FRAME_H, FRAME_W)
    tiles = [cv2.resize(chips[i], (80, 80), interpolation=cv2.INTER_AREA)
             for i in rng.integers(len(chips), size=48)]
    mosaic = np.vstack([np.hstack(tiles[r * 8:(r + 1) * 8]) for r in range(6)])
    return cv2.GaussianBlur(mosaic, (0, 0), 9)  # other faces' colours, blurred past recognition


def paste_matrix(centre, angle, scale):
    """The 2x3 map of chip pixels into the frame: rotated by ``angle`` degrees, scaled, centred at ``centre``."""
    matrix = cv2.getRotationMatrix2D((CHIP_SIDE / 2.0, CHIP_SIDE / 2.0), angle, scale)
    matrix[:, 2] += [centre[0] - CHIP_SIDE / 2.0, centre[1] - CHIP_SIDE / 2.0]
    return matrix


def scene(chip, rng, chips):
    """(frame, chip centre (x, y) in the frame, pasted chip side in pixels, angle, scale)."""
    angle = rng.uniform(-MAX_ANGLE, MAX_ANGLE)
    scale = float(np.exp(rng.uniform(np.log(SCALES[0]), np.log(SCALES[1]))))
    side = CHIP_SIDE * scale
    # The rotated chip's bounding square must fit in the frame.
    extent = side * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle))))
    extent = min(extent, FRAME_H - 2)
    cx = rng.uniform(extent / 2, FRAME_W - extent / 2)
    cy = rng.uniform(extent / 2, FRAME_H - extent / 2)
    frame = background(rng, chips).copy()
    matrix = paste_matrix((cx, cy), angle, scale)
    chip = cv2.resize(chip, (CHIP_SIDE, CHIP_SIDE), interpolation=cv2.INTER_AREA)
    warped = cv2.warpAffine(chip, matrix, (FRAME_W, FRAME_H), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((CHIP_SIDE, CHIP_SIDE), 255, np.uint8), matrix, (FRAME_W, FRAME_H))
    frame[mask > 127] = warped[mask > 127]
    return frame, (cx, cy), side, angle, scale


def build_set(utkface: Path, names, seed: int):
    chips = []
    for name in names:
        image = cv2.imread(str(utkface / name), cv2.IMREAD_COLOR)
        if image is None:
            raise KitError(f"{utkface / name}: unreadable test chip")
        chips.append(image)
    rng = np.random.default_rng(seed)
    return chips, [scene(chip, rng, chips) for chip in chips]


def truth(name: str):
    age, gender = (int(v) for v in name.split("_")[:2])
    return age, gender


def classify(job, engine_map, heads):
    for net, engine in engine_map.items():
        job.outputs[net] = [engine.infer(face) for face in job.inputs[net]]
    return job.faces(heads)


def undo_paste(frame, centre, angle, scale):
    """The chip cut back out of its frame by the inverse of the known paste: a perfect alignment."""
    return cv2.warpAffine(frame, cv2.invertAffineTransform(paste_matrix(centre, angle, scale)), (CHIP_SIDE, CHIP_SIDE),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def bucket_of(value, edges):
    return next((i for i, edge in enumerate(edges) if value < edge), len(edges))


def by_bucket(hits, key, edges, names):
    """Share of faces right per bucket of ``key`` (scale or |angle|): where the losses are."""
    tally = {}
    for hit in hits:
        row = tally.setdefault(names[bucket_of(hit[key], edges)], [0, 0, 0])
        row[0] += 1
        row[1] += hit["age"]
        row[2] += hit["gender"]
    return {name: {"faces": n, "age_exact": round(a / n, 4), "gender": round(g / n, 4)}
            for name, (n, a, g) in ((name, tally[name]) for name in names if name in tally)}


SCALE_EDGES, SCALE_NAMES = (0.8, 1.25), ("0.5-0.8x", "0.8-1.25x", "1.25-2x")
ANGLE_EDGES, ANGLE_NAMES = (10.0, 20.0), ("0-10 deg", "10-20 deg", "20-30 deg")


def score_row(label, detector, frames, chips, names, engine_map, heads, no_detect=False, undo=False):
    age_right = gender_right = found = false = 0
    errors, hits = [], []
    no_detect = no_detect or undo  # an undone paste is a chip again
    age_labels = None
    start = time.perf_counter()
    examples = []
    for i, ((frame, centre, side, angle, scale), chip, name) in enumerate(zip(frames, chips, names)):
        image = undo_paste(frame, centre, angle, scale) if undo else chip if no_detect else frame
        job = run_inference.prepare(i, name, image, None if no_detect else detector, engine_map)
        faces = classify(job, engine_map, heads)
        if age_labels is None:
            age_labels = next(h for outputs in heads.values() for h in outputs if h["task"] == "age")["labels"]
        if i < 6:
            examples.append((frame if not no_detect else chip, [f.box for f in faces]))
        if no_detect:
            match = faces[0] if faces else None
        else:
            near = [(np.hypot(f.box[0] + f.box[2] / 2.0 - centre[0], f.box[1] + f.box[3] / 2.0 - centre[1]), f)
                    for f in faces]
            near = [(d, f) for d, f in near if d <= FOUND_RADIUS * side]
            match = min(near, key=lambda pair: pair[0])[1] if near else None
            false += len(faces) - (1 if match else 0)
        hit = {"scale": scale, "angle": abs(angle), "age": False, "gender": False}
        hits.append(hit)
        if match is None:
            continue
        found += 1
        age, gender = truth(name)
        age_bin = min(age // 10, len(age_labels) - 1)
        hit["age"] = match.age == age_labels[age_bin]
        hit["gender"] = match.gender == ("Male", "Female")[gender]
        age_right += hit["age"]
        gender_right += hit["gender"]
        errors.append(abs(match.age_years - age))
    n = len(frames)
    return {"detector": label, "faces": n, "found": found, "found_share": round(found / n, 4),
            "false_detections": false,
            "age_exact": round(age_right / n, 4), "gender": round(gender_right / n, 4),
            "age_exact_of_found": round(age_right / max(found, 1), 4),
            "gender_of_found": round(gender_right / max(found, 1), 4),
            "mae_years_of_found": round(float(np.mean(errors)), 2) if errors else None,
            "ms_per_frame": round(1000 * (time.perf_counter() - start) / n, 2),
            "by_scale": by_bucket(hits, "scale", SCALE_EDGES, SCALE_NAMES),
            "by_angle": by_bucket(hits, "angle", ANGLE_EDGES, ANGLE_NAMES)}, examples


def example_sheet(path: Path, rows_examples):
    """One row of frames per detector, its boxes drawn."""
    strips = []
    for label, examples in rows_examples:
        tiles = []
        for image, boxes in examples:
            tile = cv2.resize(image, (FRAME_W, FRAME_H)) if image.shape[:2] != (FRAME_H, FRAME_W) else image.copy()
            sx, sy = FRAME_W / image.shape[1], FRAME_H / image.shape[0]
            for x, y, w, h in boxes:
                cv2.rectangle(tile, (int(x * sx), int(y * sy)), (int((x + w) * sx), int((y + h) * sy)), (0, 255, 0), 3)
            tiles.append(cv2.resize(tile, (FRAME_W // 3, FRAME_H // 3), interpolation=cv2.INTER_AREA))
        strip = np.hstack(tiles)
        cv2.putText(strip, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
        strips.append(strip)
    ok, data = cv2.imencode(".png", np.vstack(strips))
    atomic.write_bytes(path, data.tobytes())


def photo_rows(detectors, engine_map, heads, out: Path):
    """Each detector on the real group photos (caffekit.photos): faces found of those there, false boxes,
    and the annotated photo as out/photos/<photo>_<detector>.png."""
    rows = []
    for photo in photos.PHOTOS:
        try:
            path = photos.fetch(photo)
        except KitError as exc:
            rows.append({"photo": photo.name, "skipped": str(exc)})
            continue
        frame = cv2.imread(str(path))
        for label, key, detector in detectors:
            start = time.perf_counter()
            job = run_inference.prepare(0, str(path), frame, detector, engine_map)
            faces = classify(job, engine_map, heads)
            ms = 1000 * (time.perf_counter() - start)
            found = photos.matched(photo, [f.box for f in faces])
            ok, data = cv2.imencode(".png", run_inference.annotate(frame, faces))
            atomic.write_bytes(out / "photos" / f"{Path(photo.name).stem}_{key}.png", data.tobytes())
            rows.append({"photo": photo.name, "detector": label, "faces": len(photo.boxes), "found": found,
                         "false_detections": len(faces) - found, "ms": round(ms, 1)})
    return rows


def markdown(report) -> str:
    lines = ["# Faces in the wild (simulated): faces found and accuracy per detector", "",
             f"CPU: {report['cpu']}  ", f"Models: {report['models']}  ",
             f"Set: {report['set']}", "",
             "| detector | faces found | false detections | age exact (all) | gender (all) | "
             "age exact (found) | gender (found) | MAE years (found) | ms per frame |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        mae = "" if r["mae_years_of_found"] is None else f"{r['mae_years_of_found']:.2f}"
        lines.append(f"| {r['detector']} | {100 * r['found_share']:.1f}% ({r['found']}/{r['faces']}) | "
                     f"{r['false_detections']} | {100 * r['age_exact']:.1f}% | {100 * r['gender']:.1f}% | "
                     f"{100 * r['age_exact_of_found']:.1f}% | {100 * r['gender_of_found']:.1f}% | {mae} | "
                     f"{r['ms_per_frame']:.1f} |")
    lines += ["", "Where the faces are lost: accuracy (all faces of the bucket) by paste scale and by |angle|, "
              "age exact / gender:", "",
              "| detector | " + " | ".join(SCALE_NAMES + ANGLE_NAMES) + " |",
              "|---|" + "---:|" * (len(SCALE_NAMES) + len(ANGLE_NAMES))]
    for r in report["rows"]:
        cells = [r[key].get(name) for key, names in (("by_scale", SCALE_NAMES), ("by_angle", ANGLE_NAMES))
                 for name in names]
        lines.append(f"| {r['detector']} | " + " | ".join(
            "" if c is None else f"{100 * c['age_exact']:.1f} / {100 * c['gender']:.1f} ({c['faces']})"
            for c in cells) + " |")
    if report.get("photos"):
        lines += ["", "Real group photos (faces drawn by eye; a face is found when a box is centred in it; the "
                  "annotated photos are in bench/photos/):", "",
                  "| photo | detector | faces found | false boxes | ms (detection + both tasks, first call) |",
                  "|---|---|---:|---:|---:|"]
        for r in report["photos"]:
            if "skipped" in r:
                lines.append(f"| {r['photo']} | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {r['photo']} | {r['detector']} | {r['found']}/{r['faces']} | "
                             f"{r['false_detections']} | {r['ms']:.0f} |")
    return "\n".join(lines) + "\n"


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data", help="holds splits/test.txt")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models", help="IRs in ir/ (make compile-ncs)")
    parser.add_argument("--utkface", type=Path, default=REPO.parent / "shared" / "data" / "utkface")
    parser.add_argument("--model", choices=("auto", "pair", "joint"), default="auto")
    parser.add_argument("--precision", default="FP32", choices=("FP16", "FP32", "INT8"))
    parser.add_argument("--limit", type=int, help="only N test faces, drawn with the seed (a quick look)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    split = args.data_dir / "splits" / "test.txt"
    if not split.is_file():
        raise KitError(f"{split}: missing (run `make dataset` first)")
    names = split.read_text().split()
    if args.limit:  # a seeded sample: the list is sorted by name, so its head is all babies
        names = [names[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(names))[:args.limit])]
    openvino = engines.import_openvino()
    ir = args.models_dir / "ir"
    try:
        engine_map = {files.key: engines.make_engine(files, "CPU", "auto", "latency")
                      for files in all_model_files(str(ir), args.precision, args.model)}
        heads = {net: engine.outputs for net, engine in engine_map.items()}
        detectors = [("Haar cascade", HaarDetector())]
        photo_detectors = [("Haar cascade", "haar", detectors[0][1])]
        if read_detector_json(str(ir)) is not None:
            for variant in ("short", "full", "tiled"):
                # box framing; aligned by the first keypoints; aligned after the second look (the runner's way)
                for align, refine in ((False, False), (True, False), (True, True)):
                    if variant == "tiled" and not align:
                        continue
                    detector = load_detector(str(ir), "blazeface", variant, False, openvino, align, refine)
                    label = "aligned, second look" if refine else "aligned" if align else "box framing"
                    detectors.append((f"BlazeFace {variant} range, {label}", detector))
            for variant in ("short", "full", "tiled"):
                photo_detectors.append((f"BlazeFace {variant}", variant,
                                        load_detector(str(ir), "blazeface", variant, False, openvino)))
    except EdgeError as exc:
        raise KitError(str(exc))
    print(f"building the set: {len(names)} test faces", flush=True)
    chips, frames = build_set(args.utkface, names, args.seed)
    rows, sheets = [], []
    undone = "paste undone by its known transform (perfect alignment)"
    for label, detector in [("chips themselves (--no-detect)", None), (undone, None)] + detectors:
        row, examples = score_row(label, detector, frames, chips, names, engine_map, heads, detector is None,
                                  undo=label == undone)
        print(f"{label}: found {row['found']}/{row['faces']}, age {row['age_exact']:.3f}, gender {row['gender']:.3f}",
              flush=True)
        rows.append(row)
        if detector is not None:
            sheets.append((label, examples))
    report = {"cpu": hardware.read_cpu().summary(),
              "models": ", ".join(f"{e.files.net} {args.precision}" for e in engine_map.values()),
              "set": f"{len(names)} faces of {split} from {args.utkface}, seed {args.seed}: rotated up to "
                     f"+-{MAX_ANGLE:g} degrees, scaled {SCALES[0]:g}x-{SCALES[1]:g}x of a {CHIP_SIDE} px chip, "
                     f"pasted into {FRAME_W}x{FRAME_H} frames; found = a detection centre within "
                     f"{FOUND_RADIUS:g} chip sides of the chip centre; accuracy (all) counts faces not found as wrong",
              "rows": rows, "photos": photo_rows(photo_detectors, engine_map, heads, args.out)}
    atomic.write_text(args.out / "robustness.json", json.dumps(report, indent=2) + "\n")
    atomic.write_text(args.out / "robustness.md", markdown(report))
    example_sheet(args.out / "robustness_examples.png", sheets)
    print(markdown(report))


if __name__ == "__main__":
    main()
