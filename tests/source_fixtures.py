"""Small Adience and IMDB-WIKI folders in the real layouts and formats, written by the tests (no real data here).

Adience: fold_<k>_data.txt (tab-separated, the real header) and aligned/<user>/landmark_aligned_face.<id>.<image>,
with the messy rows of the real files. IMDB-WIKI: wiki_crop/wiki.mat (inside the crop folder, as the archive
unpacks) and imdb.mat beside imdb_crop/, each a 1 x 1 struct of 1 x N fields as the real files hold them,
written by scipy.io.savemat; placeholder images (all zero, 1 x 1) among the crops.
"""
import datetime
from pathlib import Path

import cv2
import numpy as np

ADIENCE_HEADER = ["user_id", "original_image", "face_id", "age", "gender", "x", "y", "dx", "dy", "tilt_ang",
                  "fiducial_yaw_angle", "fiducial_score"]
# Per fold: two users, and their rows' (age, gender). Listed groups, so every class gets faces in every fold.
GROUPS = ["(0, 2)", "(4, 6)", "(8, 12)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)"]
# The messy rows (in fold 1, user B): age text, gender, and the group (label index) or skip reason expected.
MESSY = [
    ("35", "m", 5),             # a single age between groups: nearest midpoint (40.5 vs 28.5)
    ("(25, 23)", "f", 4),       # reversed off-list range: midpoint 24 -> nearest 25-32
    ("(27, 32)", "m", 4),       # off-list range: midpoint 29.5 inside 25-32
    ("(38, 42)", "f", 5),       # off-list range: midpoint 40 inside 38-43
    ("3", "f", 0),              # a tie between 0-2 and 4-6 (midpoints 1 and 5): the younger
    ("13", "m", 2),             # between 8-12 and 15-20: 13 is 3 from 10, 4.5 from 17.5
    ("57", "f", 6),             # between 48-53 and 60+: 6.5 from 50.5, 23 from 80
    ("None", "m", "age unknown"),
    ("(25, 32)", "u", "gender unknown"),
    ("(25, 32)", "", "gender unknown"),
    ("", "f", "age unknown"),
    ("young", "m", "is not a range"),
]
IMAGE_SIZE = 48


def face_image(seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A distinct, non-blank BGR image per seed (no two byte-identical files)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, size, dtype=np.float32)[np.newaxis, :, np.newaxis]
    image = base + rng.integers(0, 55, (size, size, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def write_adience(root: Path) -> dict:
    """An Adience folder; returns what the tests expect of it: names by fold, users by fold, labels, skips."""
    root = Path(root)
    (root / "aligned").mkdir(parents=True)
    expected = {"faces": {}, "skipped": {}, "users": {}, "folds": {}}
    seed = 0
    for fold in range(5):
        lines = ["\t".join(ADIENCE_HEADER)]
        users = [f"{1000 + fold}{letter}@N0{fold}" for letter in "AB"]
        expected["users"][fold] = set(users)
        rows = [(users[0], GROUPS[i % 8], "mf"[i % 2], i % 8) for i in range(10)]
        rows += [(users[1], GROUPS[(i + 3) % 8], "fm"[i % 2], (i + 3) % 8) for i in range(6)]
        if fold == 1:
            rows += [(users[1], age, gender, outcome) for age, gender, outcome in MESSY]
        for face_id, (user, age, gender, outcome) in enumerate(rows, start=1):
            original = f"{9000000 + seed}_{seed:04x}ab_o.jpg"
            name = f"{user}/landmark_aligned_face.{face_id}.{original}"
            lines.append("\t".join([user, original, str(face_id), age, gender, "0", "0", "500", "500", "-10",
                                    "30", "17"]))
            (root / "aligned" / user).mkdir(exist_ok=True)
            (root / "aligned" / name).write_bytes(jpeg(face_image(seed)))
            if isinstance(outcome, int):
                expected["faces"][name] = {"age_class": outcome, "gender": {"m": 0, "f": 1}[gender], "fold": fold,
                                           "age_text": age}
            else:
                expected["skipped"][name] = outcome
            seed += 1
        if fold == 2:  # broken images listed with good labels, as a real copy may have
            for face_id, (data, reason) in enumerate([(b"", "zero-byte"),
                                                      (jpeg(np.zeros((48, 48, 3), np.uint8)), "blank"),
                                                      (jpeg(np.full((1, 1, 3), 128, np.uint8)), "blank"),
                                                      (None, "unreadable")], start=100):
                original = f"broken{face_id}_o.jpg"
                name = f"{users[0]}/landmark_aligned_face.{face_id}.{original}"
                lines.append("\t".join([users[0], original, str(face_id), "(25, 32)", "m"] + ["0"] * 7))
                if data is not None:
                    (root / "aligned" / name).write_bytes(data)
                expected["skipped"][name] = reason
        (root / f"fold_{fold}_data.txt").write_text("\n".join(lines) + "\n")
    for name, face in expected["faces"].items():
        expected["folds"].setdefault(face["fold"], set()).add(name)
    return expected


def matlab_day(day: datetime.date) -> float:
    return float(day.toordinal() + 366)


def _cells(values) -> np.ndarray:
    cells = np.empty((1, len(values)), dtype=object)
    for i, value in enumerate(values):
        cells[0, i] = value
    return cells


def write_mat(path: Path, database: str, records) -> None:
    """A .mat in the real layout: struct ``database`` (1 x 1) with 1 x N fields, cell arrays for the text."""
    import scipy.io

    n = len(records)
    row = lambda key: np.array([[record[key] for record in records]], dtype=np.float64)  # noqa: E731
    struct = {
        "dob": row("dob"), "photo_taken": np.array([[r["photo_taken"] for r in records]], dtype=np.uint16),
        "full_path": _cells([r["full_path"] for r in records]), "gender": row("gender"),
        "name": _cells([f"person {i}" for i in range(n)]),
        "face_location": _cells([np.array([[10.0, 10.0, 40.0, 40.0]]) for _ in range(n)]),
        "face_score": row("face_score"), "second_face_score": row("second_face_score"),
    }
    if database == "imdb":
        struct["celeb_names"] = _cells([f"person {i}" for i in range(n)])
        struct["celeb_id"] = np.array([[i + 1 for i in range(n)]], dtype=np.uint16)
    scipy.io.savemat(str(path), {database: struct})


def write_imdb_wiki(root: Path) -> dict:
    """wiki_crop/wiki.mat + wiki_crop/<nn>/..., imdb.mat + imdb_crop/<nn>/...; returns the expectations."""
    root = Path(root)
    expected = {"faces": {}, "skipped": {}}
    seed = 500
    for database in ("wiki", "imdb"):
        records = []

        def add(path, born, taken, gender=1.0, score=3.5, second=np.nan, image="face", dob=None, outcome=None):
            nonlocal seed
            records.append({"full_path": path, "dob": matlab_day(born) if dob is None else dob,
                            "photo_taken": taken, "gender": gender, "face_score": score, "second_face_score": second})
            name = f"{database}_crop/{path}"
            file = root / name
            file.parent.mkdir(parents=True, exist_ok=True)
            if image == "face":
                file.write_bytes(jpeg(face_image(seed)))
            elif image == "zeros":
                file.write_bytes(jpeg(np.zeros((60, 60, 3), np.uint8)))
            elif image == "1x1":
                file.write_bytes(jpeg(np.full((1, 1, 3), 128, np.uint8)))
            seed += 1
            if outcome is not None:
                expected["skipped"][name] = outcome
            return name

        for i in range(24):  # usable faces across decades and both genders
            born = datetime.date(1930 + 3 * i, 1 + i % 12, 1 + i % 28)
            name = add(f"{i % 4:02d}/{10000 + i}_{born}_2010.jpg", born, 2010, gender=float(i % 2))
            expected["faces"][name] = {"age": 2010 - born.year - ((born.month, born.day) > (7, 1)),
                                       "gender": 0 if i % 2 == 1 else 1}
        # The mid-year rule: born July 1 -> already that age on July 1; born July 2 -> one less.
        name = add("05/900_1980-07-01_2010.jpg", datetime.date(1980, 7, 1), 2010)
        expected["faces"][name] = {"age": 30, "gender": 0}
        name = add("05/901_1980-07-02_2010.jpg", datetime.date(1980, 7, 2), 2010, gender=0.0)
        expected["faces"][name] = {"age": 29, "gender": 1}
        day = datetime.date(1970, 3, 3)
        add("06/a.jpg", day, 2000, score=-np.inf, outcome="no face found")
        add("06/b.jpg", day, 2000, score=0.5, outcome="face_score below")
        add("06/c.jpg", day, 2000, second=2.1, outcome="a second face")
        add("06/d.jpg", datetime.date(2000, 1, 5), 2000, outcome="age outside")   # age 0
        add("06/e.jpg", datetime.date(1880, 1, 5), 2000, outcome="age outside")   # age 120
        add("06/f.jpg", day, 2000, gender=np.nan, outcome="gender unknown")
        add("06/g.jpg", day, 2000, dob=0.0, outcome="dob is not a valid date")
        add("06/h.jpg", day, 2000, image="zeros", outcome="blank")
        add("06/i.jpg", day, 2000, image="1x1", outcome="blank")
        add("06/j.jpg", day, 2000, image=None, outcome="unreadable")
        twice = records[0]["full_path"]
        records.append(dict(records[0]))  # the same path listed again
        expected.setdefault("twice", []).append(f"{database}_crop/{twice}")
        mat = root / f"{database}_crop" / f"{database}.mat" if database == "wiki" else root / f"{database}.mat"
        write_mat(mat, database, records)
    return expected
