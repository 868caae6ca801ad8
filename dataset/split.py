"""Duplicates, the train/test split, and the oversampling plan: pure functions over ``Face`` records.

Duplicate rule (byte-identical files, grouped by the sha256 of the file):
each group becomes at most one record, so a face can never sit on both sides of the split.
The members vote with the labels the nets learn, (age bin, gender):
- one label has more votes than any other -> keep one copy: the first file (by name) carrying that label;
  if the exact ages of the winners differ (same bin), the kept file's own age is its true age;
- a tie for the most votes (e.g. a pair that disagrees) -> the whole group is dropped, and listed in the manifest.

Split: stratified by (age bin, gender), so the test split has the train split's age-bin and gender mix;
within each stratum the faces are sorted by name and a seeded permutation picks round(n * test_fraction)
for test. The same folder, race and seed therefore always give the same split, whatever the listing order.
A source with its own subject-disjoint folds (Adience) can be split by fold instead: one fold is the test split,
the others train (by_fold), so no person is on both sides.

Oversampling (train split only, each task separately): every class is topped up to the size of the largest
with augmented copies, cycling through the class's faces in a seeded order, so copies spread evenly
(each face is copied k or k+1 times).
"""
import collections
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from dataset.faces import Face


class Item(NamedTuple):
    """One record of an LMDB: a face and which copy of it (0 = the original, k >= 1 = augmented copy k, -k = wild
    copy k: the face as the runner cuts it out of a photo, dataset/augment.py)."""
    face: Face
    copy: int

    def key(self, index: int) -> str:
        # Caffe's Data layer reads in key order: the zero-padded index makes key order the written order,
        # as convert_imageset --shuffle does (``%08d_<file name>``).
        suffix = f"~aug{self.copy}" if self.copy > 0 else f"~wild{-self.copy}" if self.copy else ""
        return f"{index:08d}_{self.face.name}{suffix}"


def dedup(faces: Sequence[Face]) -> Tuple[List[Face], List[dict]]:
    """Faces with byte-identical duplicates resolved by the vote above, and one report per duplicate group."""
    by_hash: Dict[str, List[Face]] = collections.defaultdict(list)
    for face in faces:
        by_hash[face.sha256].append(face)
    kept, groups = [], []
    for sha, members in by_hash.items():
        if len(members) == 1:
            kept.append(members[0])
            continue
        members = sorted(members, key=lambda face: face.name)
        votes = collections.Counter((face.age_bin, face.gender) for face in members)
        ranked = votes.most_common()
        group = {"sha256": sha, "files": [face.name for face in members],
                 "labels": [{"age": face.age, "gender": face.gender} for face in members],
                 "conflict": len(votes) > 1, "ages_differ": len({face.age for face in members}) > 1}
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            group["decision"] = "dropped: tie between conflicting labels"
            group["kept"] = None
        else:
            winner = next(face for face in members if (face.age_bin, face.gender) == ranked[0][0])
            group["decision"] = "kept one copy (majority label)" if group["conflict"] else "kept one copy"
            group["kept"] = winner.name
            kept.append(winner)
        groups.append(group)
    kept.sort(key=lambda face: face.name)
    groups.sort(key=lambda group: group["files"][0])
    return kept, groups


def stratified_split(faces: Sequence[Face], test_fraction: float, seed: int) -> Tuple[List[Face], List[Face]]:
    """(train, test), each sorted by name; stratified by (age bin, gender), reproducible from ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction {test_fraction} is not between 0 and 1")
    strata: Dict[Tuple[int, int], List[Face]] = collections.defaultdict(list)
    for face in sorted(faces, key=lambda face: face.name):
        strata[(face.age_bin, face.gender)].append(face)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for stratum in sorted(strata):
        members = strata[stratum]
        order = rng.permutation(len(members))
        n_test = int(np.floor(len(members) * test_fraction + 0.5))
        test += [members[i] for i in order[:n_test]]
        train += [members[i] for i in order[n_test:]]
    return sorted(train, key=lambda f: f.name), sorted(test, key=lambda f: f.name)


def by_fold(faces: Sequence[Face], test_fold: int) -> Tuple[List[Face], List[Face]]:
    """(train, test), each sorted by name: the faces of ``test_fold`` test, those of every other fold train."""
    ordered = sorted(faces, key=lambda face: face.name)
    return [face for face in ordered if face.fold != test_fold], [face for face in ordered if face.fold == test_fold]


def class_counts(items: Sequence, task: str, n_classes: int) -> List[int]:
    """Records per class; ``items`` are Faces or Items."""
    counts = [0] * n_classes
    for item in items:
        face = item.face if isinstance(item, Item) else item
        counts[face.label(task)] += 1
    return counts


def oversample(train: Sequence[Face], task: str, n_classes: int, seed: int) -> List[Item]:
    """The train records of ``task``: every original once, plus augmented copies until each class
    matches the largest, in a seeded shuffled order (the order the LMDB is written in)."""
    rng = np.random.default_rng([seed, 0 if task == "age" else 1])
    by_class: Dict[int, List[Face]] = collections.defaultdict(list)
    for face in sorted(train, key=lambda face: face.name):
        by_class[face.label(task)].append(face)
    largest = max(len(members) for members in by_class.values())
    items = [Item(face, 0) for face in sorted(train, key=lambda face: face.name)]
    for label in range(n_classes):
        members = by_class.get(label, [])
        if not members:
            continue  # a class with no train face cannot be oversampled; the table shows it as 0
        order = rng.permutation(len(members))
        for j in range(largest - len(members)):
            items.append(Item(members[order[j % len(members)]], j // len(members) + 1))
    return [items[i] for i in rng.permutation(len(items))]


def with_wild_copies(faces: Sequence[Face], seed: int, copies: int = 1) -> List[Item]:
    """Every face once and ``copies`` wild copies of it, in a seeded order (stream 4)."""
    faces = sorted(faces, key=lambda face: face.name)
    items = [Item(face, -k) for k in range(copies + 1) for face in faces]
    return [items[i] for i in np.random.default_rng([seed, 4]).permutation(len(items))]


def shuffled(faces: Sequence[Face], seed: int, stream: int = 2) -> List[Item]:
    """Originals only, in a seeded order: the test records (stream 2; Caffe's test phase may read only a
    prefix) and the joint net's natural train plan (stream 3)."""
    faces = sorted(faces, key=lambda face: face.name)
    rng = np.random.default_rng([seed, stream])
    return [Item(faces[i], 0) for i in rng.permutation(len(faces))]
