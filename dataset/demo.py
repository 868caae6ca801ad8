"""A synthetic, labelled, UTKFace-named image set for the smoke demo (not real faces).

    python -m dataset.demo --out demo/utkface --count 360

Each image is a 200x200 JPEG named like UTKFace (``age_gender_2_datetime.jpg.chip.jpg``, race 2 so the
default ``--race asian`` build takes them all). Its content depends on its labels, so a net can learn
something in a few iterations: a face-like ellipse that grows with the age bin and gets one forehead
"wrinkle" line per bin and greyer hair with age, a skin tone and hair length that differ by gender, all
jittered and noised. Like UTKFace, the classes are unbalanced (more 0-9 and 20-29 faces, more women), so
the build's oversampling has work to do; every age bin has both genders. The set is the same on every run.
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

from caffekit.atomic import atomic_path
from caffekit.errors import KitError, cli
from caffekit.tasks import AGE_LABELS
from dataset import utkface

SIDE = 200
SKIN = {0: (120, 150, 190), 1: (150, 160, 225)}  # BGR: gender 0 male, 1 female
# One cycle of age bins (bin b appears BIN_WEIGHTS[b] times), and the gender of each successive cycle.
BIN_WEIGHTS = [3, 1, 4, 2, 1, 1, 1, 1, 1]
CYCLE = [age_bin for age_bin, weight in enumerate(BIN_WEIGHTS) for _ in range(weight)]
CYCLE_GENDERS = [0, 1, 1, 0, 1]


def demo_face(age_bin: int, gender: int, rng: np.random.Generator) -> np.ndarray:
    """One 200x200 BGR image whose drawing encodes (age bin, gender)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    background = 60 + 80 * (xx + rng.uniform(0, 1) * yy) / (2 * SIDE)
    image = np.repeat(background[..., None], 3, axis=2) + rng.uniform(-20, 20, 3)
    centre = (SIDE // 2 + int(rng.integers(-6, 7)), SIDE // 2 + 8 + int(rng.integers(-6, 7)))
    axes = (44 + 4 * age_bin, 58 + 4 * age_bin)
    grey = 40 + 24 * age_bin  # hair greys with age
    hair_drop = 90 if gender else 25  # long hair falls beside the face
    cv2.ellipse(image, (centre[0], centre[1] - 20), (axes[0] + 12, axes[1] + 6), 0, 180, 360,
                (grey, grey, grey + 10), -1)
    for side in (-1, 1):
        x = centre[0] + side * (axes[0] + 4)
        cv2.rectangle(image, (x - 10, centre[1] - 30), (x + 10, centre[1] - 30 + hair_drop), (grey, grey, grey), -1)
    skin = np.array(SKIN[gender]) + rng.uniform(-15, 15, 3)
    cv2.ellipse(image, centre, axes, 0, 0, 360, skin.tolist(), -1)
    for eye in (-1, 1):
        cv2.circle(image, (centre[0] + eye * axes[0] // 2, centre[1] - 10), 6, (40, 30, 30), -1)
    cv2.line(image, (centre[0] - 18, centre[1] + 30), (centre[0] + 18, centre[1] + 30), (60, 60, 150), 3)
    for line in range(age_bin):  # wrinkles: one line per decade
        y = centre[1] - 28 - 5 * line
        cv2.line(image, (centre[0] - 25, y), (centre[0] + 25, y), (skin * 0.6).tolist(), 1)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_demo(out, count: int = 360, seed: int = 0) -> list:
    """Write ``count`` demo images into ``out`` (replacing an earlier demo set); returns their names."""
    out = Path(out)
    if count < 2 * len(CYCLE):
        raise KitError(f"--count {count}: need at least {2 * len(CYCLE)} images to cover 9 age bins x 2 genders")
    if out.exists():
        strangers = [entry.name for entry in out.iterdir() if utkface.parse_name(entry.name)[0] is None]
        if not out.is_dir() or strangers:
            raise KitError(f"{out}: exists and is not a demo image folder; refusing to replace it")
    rng = np.random.default_rng(seed)
    names = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for index in range(count):
            cycle, position = divmod(index, len(CYCLE))
            age_bin, gender = CYCLE[position], CYCLE_GENDERS[cycle % len(CYCLE_GENDERS)]
            top = 100 if age_bin == len(AGE_LABELS) - 1 else 10 * age_bin + 10
            age = int(rng.integers(max(1, 10 * age_bin), top))
            name = f"{age}_{gender}_2_{20260101000000000 + index}.jpg.chip.jpg"
            ok, jpeg = cv2.imencode(".jpg", demo_face(age_bin, gender, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
            (tmp / name).write_bytes(jpeg.tobytes())
            names.append(name)
    return names


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the images to")
    parser.add_argument("--count", default=360, type=int, help="number of images (default: 360)")
    parser.add_argument("--seed", default=0, type=int, help="seed of the drawing and noise (default: 0)")
    args = parser.parse_args(argv)
    names = write_demo(args.out, args.count, args.seed)
    print(f"wrote {len(names)} synthetic demo images (not real faces) to {args.out}")


if __name__ == "__main__":
    main()
