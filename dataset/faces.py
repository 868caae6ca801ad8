"""The record every source yields: one face image, its labels, and a name that stays the same between builds.

A source module (utkface, adience, imdb_wiki) turns its own label files into ``Face`` records; the build
(dataset/build.py) does the rest the same way for every source: image checks, duplicates, split,
oversampling, LMDBs. ``name`` is the image's path relative to the source's image folder: it is what the
LMDB keys, the test CSV, the split lists and the manifest show, and what --hold-out lists match.
"""
from typing import NamedTuple, Optional

from caffekit.tasks import age_to_bin


class Face(NamedTuple):
    """One usable image: its file name (relative to the image folder), labels, and content hash."""
    name: str
    age: int                          # years: exact, or a labelled range's midpoint (see the source's rules)
    gender: int                       # 0 male, 1 female
    race: Optional[int]               # UTKFace's race field; None where a source has none
    sha256: str = ""
    age_class: Optional[int] = None   # the age label where a source has its own groups (Adience); else decades
    fold: Optional[int] = None        # the source's own subject-disjoint fold, where it has folds

    @property
    def age_bin(self) -> int:
        return age_to_bin(self.age) if self.age_class is None else self.age_class

    def label(self, task: str) -> int:
        return self.age_bin if task == "age" else self.gender
