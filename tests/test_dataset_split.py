"""Duplicates, split and oversampling (dataset/split.py) and augmentation (dataset/augment.py)."""
import collections

import cv2
import numpy as np
import pytest

from caffekit.tasks import AGE_LABELS
from dataset import augment, split
from dataset.utkface import Face


def faces_with(counts_by_bin, seed=0):
    """Synthetic Faces: ``counts_by_bin[b]`` faces in age bin b, genders alternating, unique hashes."""
    rng = np.random.default_rng(seed)
    faces = []
    for age_bin, count in enumerate(counts_by_bin):
        for i in range(count):
            age = 10 * age_bin + int(rng.integers(0, 10))
            faces.append(Face(f"{age}_{i % 2}_2_{age_bin:02d}{i:05d}.jpg.chip.jpg", age, i % 2, 2,
                              sha256=f"{age_bin:02d}{i:062d}"))
    return faces


def test_dedup_keeps_one_copy_when_labels_agree():
    same = [Face("31_0_2_b.jpg.chip.jpg", 31, 0, 2, "h1"), Face("34_0_2_a.jpg.chip.jpg", 34, 0, 2, "h1"),
            Face("50_1_2_c.jpg.chip.jpg", 50, 1, 2, "h2")]
    kept, groups = split.dedup(same)
    assert [face.name for face in kept] == ["31_0_2_b.jpg.chip.jpg", "50_1_2_c.jpg.chip.jpg"]  # first by name
    assert len(groups) == 1 and groups[0]["kept"] == "31_0_2_b.jpg.chip.jpg"
    assert not groups[0]["conflict"] and groups[0]["decision"] == "kept one copy"


def test_dedup_majority_wins_and_ties_drop_the_group():
    majority = [Face("25_0_2_a.jpg.chip.jpg", 25, 0, 2, "m"), Face("45_1_2_b.jpg.chip.jpg", 45, 1, 2, "m"),
                Face("44_1_2_c.jpg.chip.jpg", 44, 1, 2, "m")]
    tie = [Face("10_0_2_d.jpg.chip.jpg", 10, 0, 2, "t"), Face("10_1_2_e.jpg.chip.jpg", 10, 1, 2, "t")]
    kept, groups = split.dedup(majority + tie)
    assert [face.name for face in kept] == ["44_1_2_c.jpg.chip.jpg"]  # first by name of the (40-49, F) winners
    by_first = {group["files"][0]: group for group in groups}
    assert by_first["10_0_2_d.jpg.chip.jpg"]["kept"] is None
    assert by_first["10_0_2_d.jpg.chip.jpg"]["decision"].startswith("dropped")
    assert by_first["25_0_2_a.jpg.chip.jpg"]["conflict"]
    assert by_first["25_0_2_a.jpg.chip.jpg"]["decision"] == "kept one copy (majority label)"


def test_split_is_stratified_reproducible_and_disjoint():
    faces = faces_with([120, 30, 200, 90, 25, 16, 14, 11, 9])
    train, test = split.stratified_split(faces, 0.2, seed=7)
    assert not {face.name for face in train} & {face.name for face in test}
    assert len(train) + len(test) == len(faces)
    assert not {face.sha256 for face in train} & {face.sha256 for face in test}
    for key in ("age_bin", "gender"):
        totals = collections.Counter(getattr(face, key) for face in faces)
        tested = collections.Counter(getattr(face, key) for face in test)
        for value, total in totals.items():
            # per (age bin, gender) stratum rounding: at most 1 off per stratum of that value
            assert abs(tested[value] - 0.2 * total) <= (2 if key == "age_bin" else 9), (key, value)
    again = split.stratified_split(list(reversed(faces)), 0.2, seed=7)
    assert again == (train, test)  # the listing order does not matter
    other = split.stratified_split(faces, 0.2, seed=8)
    assert other[1] != test


def test_split_after_dedup_cannot_leak_duplicates():
    faces = faces_with([40] * 9)
    # every third face gets a byte-identical twin with the same labels under another name
    twins = [face._replace(name=face.name.replace(".jpg", "x.jpg")) for face in faces[::3]]
    distinct, groups = split.dedup(faces + twins)
    assert len(groups) == len(twins) and len(distinct) == len(faces)
    train, test = split.stratified_split(distinct, 0.25, seed=1)
    assert not {face.sha256 for face in train} & {face.sha256 for face in test}


@pytest.mark.parametrize("task, n_classes", [("age", len(AGE_LABELS)), ("gender", 2)])
def test_oversampling_tops_every_class_up_to_the_largest(task, n_classes):
    train = faces_with([50, 7, 120, 33, 12, 5, 4, 3, 1])
    items = split.oversample(train, task, n_classes, seed=3)
    counts = split.class_counts(items, task, n_classes)
    largest = max(split.class_counts(train, task, n_classes))
    assert counts == [largest] * n_classes
    originals = [item for item in items if item.copy == 0]
    assert sorted(item.face.name for item in originals) == sorted(face.name for face in train)
    # copies spread evenly: within a class, every face is copied k or k+1 times
    copies = collections.Counter(item.face.name for item in items if item.copy)
    per_class = collections.defaultdict(list)
    for face in train:
        per_class[face.label(task)].append(copies[face.name])
    for spread in per_class.values():
        assert max(spread) - min(spread) <= 1
    # (face, copy) pairs are unique, so every augmented record differs
    assert len({(item.face.name, item.copy) for item in items}) == len(items)
    assert split.oversample(train, task, n_classes, seed=3) == items
    assert split.oversample(train, task, n_classes, seed=4) != items


def test_keys_sort_in_written_order():
    items = split.oversample(faces_with([30, 3, 5, 1, 1, 1, 1, 1, 1]), "age", 9, seed=0)
    keys = [item.key(index) for index, item in enumerate(items)]
    assert keys == sorted(keys)
    assert all(len(key.split("_")[0]) == 8 for key in keys)
    assert any(key.endswith("~aug1") for key in keys)


def test_test_split_is_shuffled_originals_only():
    faces = faces_with([10] * 9)
    items = split.shuffled(faces, seed=5)
    assert all(item.copy == 0 for item in items)
    assert sorted(item.face for item in items) == sorted(faces)
    assert items == split.shuffled(list(reversed(faces)), seed=5)


def test_augment_is_a_seeded_flip_plus_small_noise():
    image = np.random.default_rng(0).integers(20, 236, (64, 64, 3), dtype=np.uint8)
    first = augment.augment(image, 1, "a.jpg", 1)
    assert np.array_equal(first, augment.augment(image, 1, "a.jpg", 1))
    assert not np.array_equal(first, augment.augment(image, 2, "a.jpg", 1))
    assert not np.array_equal(first, augment.augment(image, 1, "b.jpg", 1))
    # odd copies are mirrored, even ones are not; both only differ by noise of a few grey levels
    for copy, reference in ((1, image[:, ::-1]), (2, image)):
        difference = augment.augment(image, 1, "a.jpg", copy).astype(float) - reference
        assert abs(difference.mean()) < 1.0
        assert augment.NOISE_SIGMA[0] * 0.8 < difference.std() < augment.NOISE_SIGMA[1] * 1.2
    with pytest.raises(ValueError):
        augment.augment(image, 1, "a.jpg", 0)


def smooth_chip(side=200):
    """A chip with structure at every place (so any misplacement shows), smooth enough that resampling does not."""
    y, x = np.mgrid[0:side, 0:side] / float(side)
    channels = [np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))]
    return (127.5 + 100 * np.stack(channels, axis=-1)).astype(np.uint8)


def test_wild_copy_is_seeded_and_sized_and_its_cut_undoes_the_paste(monkeypatch):
    chip = smooth_chip()
    first = augment.wild(chip, 1, "a.jpg", 1, 72)
    assert first.shape == (72, 72, 3) and first.dtype == np.uint8
    assert np.array_equal(first, augment.wild(chip, 1, "a.jpg", 1, 72))
    assert not np.array_equal(first, augment.wild(chip, 1, "a.jpg", 2, 72))
    assert not np.array_equal(first, augment.wild(chip, 1, "b.jpg", 1, 72))
    reference = cv2.resize(chip, (72, 72), interpolation=cv2.INTER_LINEAR).astype(float)

    def error(copy):
        return np.abs(augment.wild(chip, 1, "a.jpg", copy, 72).astype(float) - reference).mean()

    jittered = [error(copy) for copy in range(1, 21)]
    # Without the alignment error the cut is the paste's exact inverse: the chip comes back whatever the
    # rotation and scale, up to the resampling (a wrong sign or order in the inverse gives tens of grey levels).
    monkeypatch.setattr(augment, "WILD_JITTER", {"degrees": 0.0, "log_scale": 0.0, "shift": 0.0})
    exact = [error(copy) for copy in range(1, 21)]
    assert max(exact) < 1.5
    assert np.median(jittered) > 3 * np.median(exact)  # the error moves the face, as the runner's does
    with pytest.raises(ValueError):
        augment.wild(chip, 1, "a.jpg", 0, 72)


@pytest.mark.parametrize("shape, label", [((256, 256, 3), 0), ((96, 96, 3), 8), ((7, 300, 3), 1), ((1, 1, 3), 200)])
def test_raw_datum_bytes_match_protobuf(shape, label):
    from caffekit import formats
    from dataset.build import raw_datum_bytes

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = formats.array_to_datum(image.transpose(2, 0, 1), label).SerializeToString()
    assert raw_datum_bytes(image, label) == expected
    assert raw_datum_bytes(image[:, ::-1], label) == formats.array_to_datum(
        image[:, ::-1].transpose(2, 0, 1), label).SerializeToString()
