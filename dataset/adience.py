"""Adience (Eidinger, Enbar & Hassner 2014) as a source of the build: the aligned faces and the five fold files.

    python -m dataset.build --source adience --input ~/adience --fold 0 --out data/adience_fold0

The folder holds ``fold_<k>_data.txt`` (k = 0..4) and ``aligned/<user_id>/landmark_aligned_face.<face_id>.<image>``.
A fold file is tab-separated with a header line: user_id, original_image, face_id, age, gender, x, y, dx, dy,
tilt_ang, fiducial_yaw_angle, fiducial_score. The folds are subject-disjoint (each Flickr user in one fold),
which is why the build's --fold k tests on fold k and trains on the other four (Levi & Hassner's protocol)
instead of splitting at random: a random split puts one person's photos on both sides.

Age labels are the 8 groups of caffekit.tasks.ADIENCE_AGE_GROUPS. The files also hold other values; each is
mapped or skipped by these rules (``age_group``), and the manifest counts every raw value with its group:
- a listed group ``(25, 32)``: that group;
- a single age ``35``: the group containing it, else the group whose midpoint is nearest (35 -> 38-43: 40.5 is
  nearer than 28.5); a tie goes to the younger group (3 -> 0-2);
- an off-list range ``(27, 32)``, ``(38, 42)``, ``(25, 23)`` (reversed bounds are read as written, low and high):
  its midpoint, then as a single age (29.5 -> 25-32; 40 -> 38-43; 24 -> 25-32);
- ``None`` or empty: skipped ("age unknown"); anything else: skipped with the value.
Gender ``m`` is 0 (male), ``f`` 1 (female); ``u`` and empty are skipped ("gender unknown").
The age in years (the test CSV, the joint net's label) is the single age where the file gives one, else the
midpoint of the range it gives, rounded down (``(60, 100)`` -> 80): Adience has no exact ages.
"""
import csv
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from caffekit.errors import KitError
from caffekit.tasks import ADIENCE_AGE_CENTRES, ADIENCE_AGE_GROUPS, ADIENCE_AGE_LABELS
from dataset.faces import Face
from dataset.scan import Scan

FOLDS = 5
IMAGES = "aligned"
COLUMNS = ["user_id", "original_image", "face_id", "age", "gender", "x", "y", "dx", "dy", "tilt_ang",
           "fiducial_yaw_angle", "fiducial_score"]
GENDERS = {"m": 0, "f": 1}
AGE_RULE = ("the 8 groups; a listed group as it is; a single age -> the group containing it, else the group with "
            "the nearest midpoint (a tie: the younger); an off-list range -> its midpoint, then as a single age; "
            "None or empty skipped")
_RANGE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


def fold_file(folder: Path, fold: int) -> Path:
    return Path(folder) / f"fold_{fold}_data.txt"


def image_name(user_id: str, face_id: str, original_image: str) -> str:
    """The aligned face's path under aligned/, as the archive names it."""
    return f"{user_id}/landmark_aligned_face.{face_id}.{original_image}"


def nearest_group(age: float) -> int:
    """The group containing ``age``, else the one whose midpoint is nearest (a tie: the younger)."""
    for index, (lo, hi) in enumerate(ADIENCE_AGE_GROUPS):
        if lo <= age <= hi:
            return index
    return min(range(len(ADIENCE_AGE_GROUPS)), key=lambda index: (abs(age - ADIENCE_AGE_CENTRES[index]), index))


def age_group(text: str) -> Tuple[Optional[int], Optional[int], str]:
    """(group index, age in years, "") of a fold file's age field, or (None, None, reason) to skip the row."""
    value = text.strip()
    if value in ("", "None"):
        return None, None, "age unknown (None or empty)"
    match = _RANGE.match(value)
    if match:
        lo, hi = (int(bound) for bound in match.groups())
        if (lo, hi) in ADIENCE_AGE_GROUPS:
            return ADIENCE_AGE_GROUPS.index((lo, hi)), (lo + hi) // 2, ""
        return nearest_group((lo + hi) / 2), (lo + hi) // 2, ""
    if value.isdigit():
        return nearest_group(int(value)), int(value), ""
    return None, None, f"age {value!r} is not a range (lo, hi), a number or None"


def gender_label(text: str) -> Tuple[Optional[int], str]:
    value = text.strip()
    if value in GENDERS:
        return GENDERS[value], ""
    return None, "gender unknown (u or empty)" if value in ("u", "") else f"gender {value!r} is not m, f or u"


def read_fold(path: Path) -> List[List[str]]:
    """The rows of one fold file, without its header line."""
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.reader(stream, delimiter="\t"))
    except FileNotFoundError:
        raise KitError(f"{path}: Adience fold file not found (expected fold_0_data.txt .. fold_4_data.txt "
                       f"beside aligned/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KitError(f"{path}: cannot read the fold file ({exc})") from None
    if not rows or [field.strip() for field in rows[0][:len(COLUMNS)]] != COLUMNS:
        raise KitError(f"{path}: the first line is not the header {chr(9).join(COLUMNS)!r}")
    return rows[1:]


def scan(folder: Path, race: str = "all") -> Scan:
    """Every row of the five fold files as a candidate face of its fold, or a skipped entry with its reason."""
    folder = Path(folder)
    if race != "all":
        raise KitError(f"race {race!r}: Adience has no race labels (use the default, all)")
    if not (folder / IMAGES).is_dir():
        raise KitError(f"{folder / IMAGES}: Adience's aligned faces not found (expected aligned/<user_id>/"
                       f"landmark_aligned_face.<face_id>.<image> and fold_<k>_data.txt in {folder})")
    faces, skipped, rows_seen = [], [], 0
    seen: Dict[str, int] = {}
    user_fold: Dict[str, int] = {}
    raw_ages: Dict[str, Dict[str, object]] = {}
    for fold in range(FOLDS):
        path = fold_file(folder, fold)
        for line, row in enumerate(read_fold(path), start=2):
            rows_seen += 1
            where = f"{path.name}:{line}"
            if not any(field.strip() for field in row):
                rows_seen -= 1  # a blank line (some copies end with one) is no record
                continue
            if len(row) < len(COLUMNS):
                skipped.append({"file": where, "reason": f"row has {len(row)} fields, not {len(COLUMNS)}",
                                "row": where})
                continue
            user_id, original, face_id, age_text, gender_text = (field.strip() for field in row[:5])
            name = image_name(user_id, face_id, original)
            if name in seen:
                skipped.append({"file": name, "reason": "listed twice in the fold files", "row": where})
                continue
            seen[name] = fold
            if user_fold.setdefault(user_id, fold) != fold:
                skipped.append({"file": name, "reason": "user in another fold too (folds must be subject-disjoint)",
                                "row": where})
                continue
            group, years, reason = age_group(age_text)
            if group is not None:
                entry = raw_ages.setdefault(age_text, {"group": ADIENCE_AGE_LABELS[group], "rows": 0})
                entry["rows"] += 1
            gender, gender_reason = gender_label(gender_text)
            reason = reason or gender_reason
            if reason:
                skipped.append({"file": name, "reason": reason, "row": where})
                continue
            faces.append(Face(name, years, gender, None, age_class=group, fold=fold))
    faces.sort(key=lambda face: face.name)
    rules = {"age": AGE_RULE,
             "gender": "m -> 0 (Male), f -> 1 (Female); u and empty skipped",
             "age_years": "the single age where the file gives one, else the midpoint of the range it gives, "
                          "rounded down ((60, 100) -> 80): Adience has no exact ages",
             "age_values": dict(sorted(raw_ages.items()))}
    return Scan(folder / IMAGES, faces, skipped, {"files": rows_seen, "users": len(user_fold)},
                list(ADIENCE_AGE_LABELS), rules)
