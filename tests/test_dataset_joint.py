"""What `make dataset` writes for the joint net: its image LMDB (age in years as the label) and a label LMDB
of genders in the same key order, its mean at its own size, the infogain matrix and the test CSV."""
import csv
import json

import numpy as np
import pytest

from caffekit import formats, models
from caffekit.lmdb_data import LmdbSource
from dataset import augment, utkface

import oracle


@pytest.fixture(scope="module")
def built(tmp_path_factory, utkface_dir):
    # JOINT_PLAN=age: the joint LMDBs in the age net's key order, with its copies.
    return oracle.built_dataset(utkface_dir, tmp_path_factory.mktemp("built"), 120, seed=3, size=48,
                                test_fraction=0.25, joint_size=40, joint_plan="age")


def records(path):
    source = LmdbSource(path)
    try:
        return [(key.decode(), *source.image_label(i)) for i, key in enumerate(source.keys)]
    finally:
        source.close()


@pytest.mark.parametrize("split", ["train", "test"])
def test_joint_lmdbs_pair_each_image_with_its_age_in_years_and_its_gender(built, split):
    images = records(built / "lmdb" / f"joint_{split}_lmdb")
    genders = records(built / "lmdb" / f"joint_{split}_gender_lmdb")
    age_net = records(built / "lmdb" / f"age_{split}_lmdb")
    assert [r[0] for r in images] == [r[0] for r in genders] == [r[0] for r in age_net]  # one key order
    for (key, image, age), (_, pixel, gender) in zip(images, genders):
        name = key.split("_", 1)[1].split("~")[0]
        true_age, true_gender = (int(v) for v in name.split("_")[:2])
        assert image.shape == (3, 40, 40)
        assert age == min(true_age, models.AGE_YEARS_MAX)
        assert gender == true_gender and pixel.shape == (1, 1, 1) and pixel[0, 0, 0] == true_gender


def test_joint_mean_infogain_and_test_csv(built):
    mean = formats.read_mean(built / "joint_mean.binaryproto")
    assert mean.shape == (3, 40, 40) and 40 < mean.mean() < 220
    infogain = formats.read_blob(built / "joint_infogain.binaryproto").reshape(101, 101)
    np.testing.assert_allclose(infogain.sum(axis=1), 1.0, rtol=1e-5)
    assert infogain[30].argmax() == 30 and infogain[30, 28] == pytest.approx(infogain[30, 32])
    assert infogain[30, 32] / infogain[30, 30] == pytest.approx(np.exp(-0.5), rel=1e-4)  # sigma 2 years
    with open(built / "joint_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [r[0] for r in records(built / "lmdb" / "joint_test_lmdb")]
    assert [row["key"] for row in rows] == keys
    assert all(int(row["label"]) == min(int(row["age"]), 100) for row in rows)


def test_manifest_counts_the_joint_heads_for_the_prior_correction(built):
    classes = json.loads((built / "manifest.json").read_text())["classes"]
    age, gender = classes["joint_age"], classes["joint_gender"]
    assert len(age["train"]) == 101 and len(gender["train"]) == 2
    assert sum(age["train"]) == sum(classes["age"]["train"])
    assert sum(age["train_oversampled"]) == sum(classes["age"]["train_oversampled"])  # the age net's plan
    assert gender["train"] == classes["gender"]["train"]


def test_default_joint_plan_is_natural_and_writes_every_train_face_once_with_its_gender(tmp_path, utkface_dir):
    built = oracle.built_dataset(utkface_dir, tmp_path, 60, seed=3, size=32, test_fraction=0.25, joint_size=24)
    manifest = json.loads((built / "manifest.json").read_text())
    images = records(built / "lmdb" / "joint_train_lmdb")
    genders = records(built / "lmdb" / "joint_train_gender_lmdb")
    names = [key.split("_", 1)[1] for key, _, _ in images]
    train = (built / "splits" / "train.txt").read_text().split()
    assert sorted(names) == sorted(train) and len(set(names)) == len(names)  # once each, no augmented copies
    assert [r[0] for r in genders] == [r[0] for r in images]
    assert all(pixel[0, 0, 0] == int(name.split("_")[1]) for name, (_, pixel, _) in zip(names, genders))
    assert manifest["config"]["joint_plan"] == "natural"
    for head in ("joint_age", "joint_gender"):
        assert manifest["classes"][head]["train_oversampled"] == manifest["classes"][head]["train"]
    assert manifest["classes"]["age"]["train_oversampled"] != manifest["classes"]["age"]["train"]  # pair unchanged


def test_wild_plan_adds_one_wild_copy_per_train_face_exactly_as_augment_wild_cuts_it(tmp_path, utkface_dir):
    # JOINT_PLAN=wild: each train face once and once more as augment.wild cuts it from the original (the runner's
    # photo framing; oracle.built_dataset builds with seed 1), the gender LMDB in the same order; the test LMDB
    # holds originals only.
    built = oracle.built_dataset(utkface_dir, tmp_path, 40, seed=3, size=32, test_fraction=0.25, joint_size=24,
                                 joint_plan="wild")
    images = records(built / "lmdb" / "joint_train_lmdb")
    genders = records(built / "lmdb" / "joint_train_gender_lmdb")
    train = (built / "splits" / "train.txt").read_text().split()
    names = [key.split("_", 1)[1] for key, _, _ in images]
    assert sorted(names) == sorted(train + [name + "~wild1" for name in train])
    assert [r[0] for r in genders] == [r[0] for r in images]
    for name, image, _ in images:
        face = name.split("_", 1)[1].split("~")[0]
        original = utkface.load(utkface_dir / face, augment.WILD_CHIP)
        expected = augment.wild(original, 1, face, 1, 24) if name.endswith("~wild1") else utkface.load(
            utkface_dir / face, 24)
        assert np.array_equal(image, expected.transpose(2, 0, 1)), name
    test_names = [key.split("_", 1)[1] for key, _, _ in records(built / "lmdb" / "joint_test_lmdb")]
    assert all("~" not in name for name in test_names)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["config"]["joint_plan"] == "wild"
    assert manifest["augmentation"]["wild_copies"]["alignment_error_sd"] == augment.WILD_JITTER
    assert sum(manifest["classes"]["joint_age"]["train_oversampled"]) == 2 * len(train)
