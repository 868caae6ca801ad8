"""IMDB-WIKI (Rothe, Timofte & Van Gool 2015) as a source of the build: imdb.mat / wiki.mat and the face crops.

    python -m dataset.build --source imdb-wiki --input ~/imdb-wiki --out data/imdb-wiki --encoded

The folder holds ``imdb_crop/`` and/or ``wiki_crop/``, each with its ``imdb.mat`` / ``wiki.mat`` inside (as the
archives unpack) or beside it. A .mat holds a 1 x 1 struct ``imdb`` / ``wiki`` whose fields are 1 x N arrays:
``dob`` (a MATLAB serial day number), ``photo_taken`` (a year), ``full_path`` (a cell array of paths relative to
the crop folder, e.g. ``17/10000217_1981-05-05_2009.jpg``), ``gender`` (1 male, 0 female, NaN unknown),
``face_location``, ``face_score`` (-Inf where no face was found), ``second_face_score`` (NaN where there is no
second face), ``name``, and in imdb.mat ``celeb_names`` / ``celeb_id``. scipy.io.loadmat reads the struct as
``mat["wiki"][0, 0]``, each field as a 1 x N array (``["full_path"][0][i][0]`` is the i-th path).

Labels: the age is the age on July 1 of ``photo_taken`` (the year of the photo is all that is known, so it
is taken mid-year) of a person born on ``dob``; gender is mapped to the kit's 0 male, 1 female. Each record
passes these filters, in this order, or is skipped with the first one it fails (the manifest counts the reasons):
- the path is listed once (a second listing is skipped) and ``dob`` is a valid date;
- ``face_score`` >= --min-face-score (default 1.0; -Inf: no face found), as the dataset's authors advise;
- no second face (``second_face_score`` NaN; --allow-second-face keeps them): the crop may show the other one;
- an age within --ages (default 1 99, i.e. 0 < age < 100: the rest are mostly wrong dates);
- a known gender (always: every build writes both tasks' LMDBs).
The images are then washed like every source's (dataset/utkface.check_image): unreadable, truncated and
blank images (all one colour, which includes the archive's 1 x 1 and flat grey placeholders) are skipped.
"""
import datetime
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from caffekit.errors import KitError
from caffekit.tasks import AGE_LABELS, MAX_AGE
from dataset.faces import Face
from dataset.scan import Scan

DATABASES = ("imdb", "wiki")
MIN_FACE_SCORE = 1.0
AGES = (1, 99)
MATLAB_DAY_ONE = 366  # MATLAB's serial day 1 is 1 January of year 0; Python's ordinal 1 is 1 January of year 1
NO_FACE = "no face found (face_score -Inf)"
LOW_SCORE = "face_score below the minimum"
SECOND_FACE = "a second face in the photo (second_face_score set)"
BAD_AGE = "age outside the range"
NO_GENDER = "gender unknown (NaN)"
BAD_DOB = "dob is not a valid date"
TWICE = "listed twice in the .mat"


def mat_path(folder: Path, database: str) -> Path:
    """<database>_crop/<database>.mat as the archive unpacks, else <database>.mat beside the crop folder."""
    inside = Path(folder) / f"{database}_crop" / f"{database}.mat"
    return inside if inside.is_file() else Path(folder) / f"{database}.mat"


def birth_date(dob: float) -> datetime.date:
    """The date of a MATLAB serial day number (raises ValueError for one that is no date)."""
    if not math.isfinite(dob) or dob < MATLAB_DAY_ONE + 1:
        raise ValueError(f"dob {dob}")
    return datetime.date.fromordinal(int(dob) - MATLAB_DAY_ONE)


def age_at_mid_year(born: datetime.date, year: int) -> int:
    """Age on July 1 of ``year``: the photo's year is all the data says about when it was taken."""
    return year - born.year - ((born.month, born.day) > (7, 1))


def _text(cell) -> str:
    # loadmat gives each cell of a cell array of strings as a 1-element array of str (0 elements when empty).
    return str(cell[0]) if getattr(cell, "size", 0) else ""


def read_mat(path: Path, database: str) -> Dict[str, list]:
    """The fields the build uses, as Python lists of one value a record."""
    try:
        import scipy.io
    except ImportError:
        raise KitError(f"{path}: reading IMDB-WIKI needs scipy (pip install scipy)") from None
    try:
        struct = scipy.io.loadmat(str(path))[database][0, 0]
        fields = {"full_path": [_text(cell) for cell in struct["full_path"][0]]}
        for key in ("dob", "photo_taken", "gender", "face_score", "second_face_score"):
            fields[key] = [float(value) for value in struct[key][0]]
    except FileNotFoundError:
        raise KitError(f"{path}: not found") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError,
            scipy.io.matlab.MatReadError) as exc:
        raise KitError(f"{path}: not an IMDB-WIKI .mat with a struct {database!r} "
                       f"({exc.__class__.__name__}: {exc})") from None
    lengths = {key: len(values) for key, values in fields.items()}
    if len(set(lengths.values())) != 1:
        raise KitError(f"{path}: fields of different lengths {lengths}")
    return fields


def record_label(fields: Dict[str, list], i: int, min_face_score: float, allow_second_face: bool,
                 ages: Sequence[int]) -> Tuple[int, int, str]:
    """(age, gender, "") of record ``i``, or (0, 0, reason) when a filter leaves it out."""
    try:
        born = birth_date(fields["dob"][i])
    except (ValueError, OverflowError):
        return 0, 0, BAD_DOB
    score = fields["face_score"][i]
    if math.isinf(score) and score < 0:
        return 0, 0, NO_FACE
    if not score >= min_face_score:
        return 0, 0, LOW_SCORE
    if not allow_second_face and not math.isnan(fields["second_face_score"][i]):
        return 0, 0, SECOND_FACE
    age = age_at_mid_year(born, int(fields["photo_taken"][i]))
    if not ages[0] <= age <= ages[1]:
        return 0, 0, BAD_AGE
    gender = fields["gender"][i]
    if math.isnan(gender):
        return 0, 0, NO_GENDER
    return age, 0 if gender == 1 else 1, ""  # the file: 1 male, 0 female; the kit: 0 male, 1 female


def scan(folder: Path, race: str = "all", databases: Sequence[str] = (), min_face_score: float = MIN_FACE_SCORE,
         allow_second_face: bool = False, ages: Sequence[int] = AGES) -> Scan:
    """The records of imdb.mat and/or wiki.mat (``databases``; default: those present) that pass the filters."""
    folder = Path(folder)
    if race != "all":
        raise KitError(f"race {race!r}: IMDB-WIKI has no race labels (use the default, all)")
    if not folder.is_dir():
        raise KitError(f"{folder}: IMDB-WIKI folder not found (expected imdb_crop/ and/or wiki_crop/ with their .mat)")
    if not 0 <= ages[0] <= ages[1] <= MAX_AGE:
        raise KitError(f"ages {ages[0]}..{ages[1]}: expected 0 <= first <= last <= {MAX_AGE}")
    databases = list(databases) or [db for db in DATABASES if mat_path(folder, db).is_file()]
    if not databases:
        raise KitError(f"{folder}: neither imdb_crop/imdb.mat nor wiki_crop/wiki.mat found")
    faces: List[Face] = []
    skipped: List[dict] = []
    counts = {"files": 0}
    seen = set()
    for database in databases:
        if database not in DATABASES:
            raise KitError(f"IMDB-WIKI database {database!r}: expected one of {', '.join(DATABASES)}")
        fields = read_mat(mat_path(folder, database), database)
        counts[database] = len(fields["full_path"])
        counts["files"] += len(fields["full_path"])
        for i, path in enumerate(fields["full_path"]):
            name = f"{database}_crop/{path}"
            age, gender, reason = (0, 0, TWICE) if name in seen else record_label(
                fields, i, min_face_score, allow_second_face, ages)
            seen.add(name)
            if reason:
                skipped.append({"file": name, "reason": reason})
            else:
                faces.append(Face(name, age, gender, None))
    faces.sort(key=lambda face: face.name)
    rules = {"age": "age on July 1 of photo_taken of a person born on dob (MATLAB serial day), in decade bins",
             "gender": "the .mat's 1 (male) -> 0 (Male), 0 (female) -> 1 (Female); NaN skipped",
             "filters": {"min_face_score": min_face_score, "allow_second_face": allow_second_face,
                         "ages": list(ages), "gender": "known",
                         "images": "unreadable, truncated and blank (all one colour, e.g. 1 x 1) images skipped"},
             "databases": databases}
    return Scan(folder, faces, skipped, counts, list(AGE_LABELS), rules)
