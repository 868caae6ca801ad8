"""The dataset sources the build reads, by the name `--source` / `make dataset SOURCE=` takes.

Each source is one module with ``scan(folder, race, **options) -> Scan``: it reads its own label files and
yields the candidate faces (path, labels, a stable name), the records it left out and why, and its age labels.
Everything after that (image checks, duplicates, split, oversampling, LMDBs, manifest) is dataset/build.py's,
the same for every source.
"""
from pathlib import Path

from caffekit import models
from caffekit.errors import KitError
from dataset import adience, imdb_wiki, utkface
from dataset.scan import Scan

SOURCES = {"utkface": utkface, "adience": adience, "imdb-wiki": imdb_wiki}
FOLDS = {"adience": adience.FOLDS}  # sources with their own subject-disjoint folds (--fold)
DEFAULT_RACE = {"utkface": "asian"}  # the others have no race labels: all


def scan(source: str, folder: Path, race: str = None, **options) -> Scan:
    if source not in SOURCES:
        raise KitError(f"source {source!r}: expected one of {', '.join(SOURCES)}")
    found = SOURCES[source].scan(Path(folder), race or DEFAULT_RACE.get(source, "all"), **options)
    if tuple(found.age_labels) != models.source_age_labels(source):
        raise KitError(f"{source}: the source's age labels differ from the registry's (caffekit/models.py)")
    return found
