"""UTKFace file names and image checks: which files of a folder are usable, and why the others are not.

A UTKFace name carries the labels: ``age_gender_race_datetime.jpg.chip.jpg`` (gender 0 male, 1 female;
race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others; ages 0..116).

Malformed names in the public set, and what this module does with them:

- ``24_0_1_20170116220224657 .jpg.chip.jpg`` (a space before ``.jpg``) and
  ``55_0_0_20170116232725357jpg.chip.jpg`` (a missing dot): all four label fields are intact, so they are
  recovered and used.
- ``39_1_20170116174525125.jpg.chip.jpg``, ``61_1_20170109142408075.jpg.chip.jpg``,
  ``61_1_20170109150557335.jpg.chip.jpg``: one of the four fields is missing. The design notes call it the
  race field, but looking at the three faces the ``1`` reads as race (Black) in the first and as gender
  (female) in the others, so which label is missing cannot be told from the name: they are skipped.

Everything else that is not ``<digits>_<digits>_<digits>_<digits>.jpg[.chip.jpg]`` is skipped with a reason.

As a source of the build (dataset/sources.py): ``scan`` yields the faces of one folder (no subfolders), named by
their file name, age labels in decade bins. ``check_image`` is the image check of every source.
"""
import os
import re
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

from caffekit.errors import KitError
from caffekit.tasks import AGE_LABELS, MAX_AGE
from dataset.faces import Face
from dataset.scan import Scan

RACES = {"white": 0, "black": 1, "asian": 2, "indian": 3, "others": 4, "all": None}

# The datetime field is 17 digits in the public set; any run of digits is accepted.
_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)( ?\.|)jpg(\.chip\.jpg)?$")
_THREE_FIELDS = re.compile(r"^(\d+)_(\d+)_(\d+)( ?\.|)jpg(\.chip\.jpg)?$")

JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"


def parse_name(name: str) -> Tuple[Optional[Face], str]:
    """The labels in a UTKFace file name: ``(Face, "")``, or ``(None, reason)`` when the name is unusable."""
    match = _NAME.match(name)
    if not match:
        if _THREE_FIELDS.match(name):
            return None, "name has 3 label fields, not 4: cannot tell whether gender or race is missing"
        return None, "name is not age_gender_race_datetime.jpg.chip.jpg"
    age, gender, race = (int(field) for field in match.groups()[:3])
    if age > MAX_AGE:
        return None, f"age {age} outside 0..{MAX_AGE}"
    if gender not in (0, 1):
        return None, f"gender {gender} is not 0 (male) or 1 (female)"
    if race not in RACES.values():
        return None, f"race {race} is not one of 0..4"
    return Face(name, age, gender, race), ""


def scan(folder: Path, race: str = "asian") -> Scan:
    """Candidates of the selected race by name, files skipped for their names, and the folder's file count."""
    folder = Path(folder)
    if not folder.exists():
        raise KitError(f"{folder}: UTKFace folder not found (run `make download`, or put the images there)")
    if not folder.is_dir():
        raise KitError(f"{folder}: not a folder (expected a folder of UTKFace images)")
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise KitError(f"{folder}: cannot list folder ({exc.strerror})") from None
    if not entries:
        raise KitError(f"{folder}: folder is empty (expected UTKFace images)")
    if race not in RACES:
        raise KitError(f"race {race!r}: expected one of {', '.join(RACES)}")
    wanted = RACES[race]
    candidates, skipped, other_race = [], [], 0
    for name in entries:
        if not (folder / name).is_file():
            skipped.append({"file": name, "reason": "not a regular file (subfolders are not searched)"})
            continue
        face, reason = parse_name(name)
        if face is None:
            skipped.append({"file": name, "reason": reason})
        elif wanted is not None and face.race != wanted:
            other_race += 1
        else:
            candidates.append(face)
    return Scan(folder, candidates, skipped, {"files": len(entries), "other_race": other_race}, list(AGE_LABELS),
                {"age": "decade bins of the age in the file name (80+ for 80 and over)"})


def check_image(data: bytes) -> Tuple[Optional[np.ndarray], str]:
    """The decoded BGR image of a file's bytes, or ``(None, reason)`` when it is unusable."""
    if not data:
        return None, "zero-byte file"
    if data.startswith(JPEG_START) and not data.rstrip(b"\0").endswith(JPEG_END):
        # libjpeg fills a truncated image with grey and only warns, so check the end-of-image marker.
        return None, "truncated JPEG (no end-of-image marker)"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None, "not a readable image"
    if (image == image[0, 0]).all():
        return None, "blank image (all one colour)"
    return image, ""


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` x ``size`` copy, as Caffe's convert_imageset --resize_height/--resize_width makes it."""
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def load(path: Path, size: int) -> np.ndarray:
    """A checked image file, resized to ``size`` square, BGR HWC uint8 (raises ValueError if unusable)."""
    image, reason = check_image(Path(path).read_bytes())
    if image is None:
        raise ValueError(f"{path}: {reason}")
    return resize(image, size)
