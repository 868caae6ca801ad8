"""The dataset build end to end (dataset/build.py) on real UTKFace files, and its outputs checked record by record."""
import collections
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import textwrap

import cv2
import numpy as np
import pytest

from caffekit import formats
from caffekit.tasks import age_to_bin
from dataset import augment, utkface
from dataset.build import build
from dataset.lmdb_io import lmdb_hash, read_records

SIZE = 96  # small images keep the test fast; the code path is the same as at 256
SEED = 3
PER_BIN = 26
KEY = re.compile(r"^(\d{8})_(.+?)(?:~aug(\d+))?$")
MALFORMED_RECOVERED = ["24_0_1_20170116220224657 .jpg.chip.jpg", "55_0_0_20170116232725357jpg.chip.jpg"]
THREE_FIELDS = ["39_1_20170116174525125.jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg",
                "61_1_20170109150557335.jpg.chip.jpg"]


def labels_of(name):
    age, gender = (int(field) for field in re.split(r"_", name)[:2])
    return age, gender


@pytest.fixture(scope="module")
def source(utkface_dir, tmp_path_factory):
    """A few hundred real UTKFace files (every age bin, all races), the real malformed names, byte-identical
    copies under other names (agreeing, tied and majority labels), and broken files."""
    folder = tmp_path_factory.mktemp("utkface")
    by_bin = collections.defaultdict(list)
    for name in sorted(os.listdir(utkface_dir)):
        face, _ = utkface.parse_name(name)
        if face is not None and name not in MALFORMED_RECOVERED:
            by_bin[face.age_bin].append(name)
    chosen = [name for age_bin in sorted(by_bin) for name in by_bin[age_bin][::37][:PER_BIN]]
    for name in chosen + [name for name in MALFORMED_RECOVERED + THREE_FIELDS if (utkface_dir / name).exists()]:
        shutil.copyfile(utkface_dir / name, folder / name)
    a, b, c = chosen[5], chosen[60], chosen[120]
    a_age, a_gender = labels_of(a)
    b_age, b_gender = labels_of(b)
    c_age, c_gender = labels_of(c)
    other_bin_age = 85 if c_age < 80 else 15
    copies = {
        "agree": (a, f"{a_age}_{a_gender}_2_29990101000000001.jpg.chip.jpg"),
        "tie": (b, f"{b_age}_{1 - b_gender}_2_29990101000000002.jpg.chip.jpg"),
        "majority1": (c, f"{other_bin_age}_{c_gender}_2_29990101000000003.jpg.chip.jpg"),
        "majority2": (c, f"{other_bin_age}_{c_gender}_2_29990101000000004.jpg.chip.jpg"),
    }
    for original, copy in copies.values():
        shutil.copyfile(folder / original, folder / copy)
    good = (folder / a).read_bytes()
    broken = {
        "30_0_2_29990101000000010.jpg.chip.jpg": b"",
        "31_0_2_29990101000000011.jpg.chip.jpg": good[: len(good) // 2],
        "32_1_2_29990101000000012.jpg.chip.jpg": cv2.imencode(".jpg", np.full((200, 200, 3), 90, np.uint8))[1],
        "33_1_2_29990101000000013.jpg.chip.jpg": b"this is a text file, not an image\n",
        "200_1_2_29990101000000014.jpg.chip.jpg": good,
        "notes.txt": b"not an image",
    }
    for name, data in broken.items():
        (folder / name).write_bytes(bytes(data))
    return {"folder": folder, "copies": copies, "broken": broken, "chosen": chosen}


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "data"
    manifest = build(source["folder"], out, race="all", size=SIZE, seed=SEED, workers=2, progress=False)
    return out, manifest


def expected_image(folder, name):
    """What a record of ``name`` must hold: the file decoded by OpenCV, resized bilinearly, BGR HWC."""
    image = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def records_of(out, name):
    return [(key.decode(), formats.parse_datum(value)) for key, value in read_records(out / "lmdb" / name)]


@pytest.mark.slow
def test_every_record_decodes_to_its_resized_source_and_label(source, built):
    out, manifest = built
    folder = source["folder"]
    for lmdb_name in ("age_train_lmdb", "age_test_lmdb", "gender_train_lmdb", "gender_test_lmdb"):
        task = lmdb_name.split("_")[0]
        records = records_of(out, lmdb_name)
        assert len(records) == manifest["outputs"][f"lmdb/{lmdb_name}"]["records"] > 0
        for position, (key, datum) in enumerate(records):
            index, name, copy = KEY.match(key).groups()
            assert int(index) == position
            assert (datum.channels, datum.height, datum.width, datum.encoded) == (3, SIZE, SIZE, False)
            age, gender = labels_of(name)
            assert datum.label == (age_to_bin(age) if task == "age" else gender), key
            pixels = formats.datum_to_array(datum).transpose(1, 2, 0)
            original = expected_image(folder, name)
            if copy is None:
                assert np.array_equal(pixels, original), key
                continue
            assert "test" not in lmdb_name, "augmented copies must never reach a test LMDB"
            # an augmented copy: exactly the seeded augmentation of its source ...
            assert np.array_equal(pixels, augment.augment(original, SEED, name, int(copy))), key
            # ... which is the (odd copies: mirrored) source plus zero-mean noise of a few grey levels
            reference = original[:, ::-1] if int(copy) % 2 else original
            noise = pixels.astype(float) - reference
            assert abs(noise.mean()) < 1.5 and noise.std() < augment.NOISE_SIGMA[1] * 1.3, key


def test_class_counts_balance_train_only(built):
    out, manifest = built
    for task, n_classes in (("age", 9), ("gender", 2)):
        table = manifest["classes"][task]
        train_labels = collections.Counter(d.label for _, d in records_of(out, f"{task}_train_lmdb"))
        test_labels = collections.Counter(d.label for _, d in records_of(out, f"{task}_test_lmdb"))
        assert [train_labels[c] for c in range(n_classes)] == table["train_oversampled"]
        assert [test_labels[c] for c in range(n_classes)] == table["test"]
        assert len(set(table["train_oversampled"])) == 1
        assert table["train_oversampled"][0] == max(table["train"])
        originals = collections.Counter(d.label for key, d in records_of(out, f"{task}_train_lmdb")
                                        if "~aug" not in key)
        assert [originals[c] for c in range(n_classes)] == table["train"]


def test_no_content_leaks_between_train_and_test(source, built):
    out, manifest = built
    folder = source["folder"]

    def sources(lmdb_name):
        return {KEY.match(key.decode()).group(2) for key, _ in read_records(out / "lmdb" / lmdb_name)}

    train, test = sources("age_train_lmdb"), sources("age_test_lmdb")
    assert train == sources("gender_train_lmdb") and test == sources("gender_test_lmdb")
    digest = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in train | test}
    assert not {digest[n] for n in train} & {digest[n] for n in test}
    assert len({digest[n] for n in train | test}) == len(train | test)  # one copy per content
    assert (out / "splits" / "train.txt").read_text().split("\n")[:-1] == sorted(train)
    assert (out / "splits" / "test.txt").read_text().split("\n")[:-1] == sorted(test)
    copies = source["copies"]
    used = train | test
    assert len(used & set(copies["agree"])) == 1
    assert not used & set(copies["tie"])
    majority_group = {copies["majority1"][0], copies["majority1"][1], copies["majority2"][1]}
    assert used & majority_group == {copies["majority1"][1]}  # two votes beat one; first winner by name
    groups = {group["files"][0]: group for group in manifest["duplicates"]["details"]}
    tie = groups[min(copies["tie"])]
    assert tie["kept"] is None and tie["conflict"]


def test_test_csv_lists_the_test_lmdb_in_order(built):
    out, _ = built
    for task in ("age", "gender"):
        with open(out / f"{task}_test.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        records = records_of(out, f"{task}_test_lmdb")
        assert [row["key"] for row in rows] == [key for key, _ in records]
        for row, (key, datum) in zip(rows, records):
            age, gender = labels_of(row["source"])
            assert (int(row["age"]), int(row["gender"]), int(row["label"])) == (age, gender, datum.label)


def test_mean_is_the_mean_of_the_original_train_images(built):
    out, manifest = built
    originals = [formats.datum_to_array(d).astype(np.float64)
                 for key, d in records_of(out, "age_train_lmdb") if "~aug" not in key]
    assert len(originals) == manifest["mean"]["images"] == manifest["split"]["train"]
    mean = formats.read_mean(out / "mean.binaryproto")
    assert mean.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(mean, np.mean(originals, axis=0), atol=1e-4)
    assert np.array_equal(np.load(out / "mean.npy"), mean)


def test_skipped_files_are_named_with_reasons(source, built):
    _, manifest = built
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    expected = {
        "30_0_2_29990101000000010.jpg.chip.jpg": "zero-byte",
        "31_0_2_29990101000000011.jpg.chip.jpg": "truncated JPEG",
        "32_1_2_29990101000000012.jpg.chip.jpg": "blank",
        "33_1_2_29990101000000013.jpg.chip.jpg": "not a readable image",
        "200_1_2_29990101000000014.jpg.chip.jpg": "age 200 outside",
        "notes.txt": "not age_gender_race_datetime",
    }
    expected.update({name: "3 label fields" for name in THREE_FIELDS if (source["folder"] / name).exists()})
    for name, words in expected.items():
        assert words in reasons[name], name
    assert len(reasons) == len(expected)
    assert manifest["source"]["files"] == len(os.listdir(source["folder"]))


def test_manifest_hashes_match_the_outputs(built):
    out, manifest = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    for relative, output in manifest["outputs"].items():
        if relative.startswith("lmdb/"):
            assert lmdb_hash(out / relative) == output
        else:
            assert hashlib.sha256((out / relative).read_bytes()).hexdigest() == output["sha256"]
    assert manifest["versions"]["numpy"] == np.__version__
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name or ".old-" in path.name]


@pytest.mark.slow
def test_build_is_deterministic_whatever_the_thread_count(source, built, tmp_path):
    _, manifest = built
    again = build(source["folder"], tmp_path / "again", race="all", size=SIZE, seed=SEED, workers=1,
                  progress=False)
    assert again["outputs"] == manifest["outputs"]
    assert {**again, "config": None} == {**manifest, "config": None}


def test_other_seed_gives_another_split(source, built, tmp_path):
    _, manifest = built
    other = build(source["folder"], tmp_path / "other", race="asian", size=16, seed=SEED + 1, progress=False)
    assert other["config"]["race"] == "asian"
    assert other["outputs"]["splits/test.txt"] != manifest["outputs"]["splits/test.txt"]
    assert other["source"]["other_race"] > 0


def test_pretraining_set_holds_out_the_test_faces_and_their_copies(source, tmp_path):
    """The all-races pre-training set built with --hold-out never contains a test face of the Asian build,
    not even as a byte-identical copy under another name (here: the same face labelled White), and keeps
    every other face."""
    asian = build(source["folder"], tmp_path / "asian", race="asian", size=16, seed=SEED, progress=False)
    held_list = tmp_path / "asian" / "splits" / "test.txt"
    held = set(held_list.read_text().splitlines())
    folder = tmp_path / "utkface"
    shutil.copytree(source["folder"], folder)
    face = sorted(held)[0]
    age, gender = labels_of(face)
    white_copy = f"{age}_{gender}_0_29990101000000099.jpg.chip.jpg"
    shutil.copyfile(folder / face, folder / white_copy)

    pretrain = build(folder, tmp_path / "pretrain", race="all", size=16, seed=SEED, progress=False,
                     hold_out_lists=[held_list])
    everything = build(folder, tmp_path / "all", race="all", size=16, seed=SEED, progress=False)

    def sha(name):
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()

    def faces_of(out):
        return set((out / "splits" / "train.txt").read_text().splitlines()) | \
            set((out / "splits" / "test.txt").read_text().splitlines())

    used, all_used = faces_of(tmp_path / "pretrain"), faces_of(tmp_path / "all")
    held_shas = {sha(name) for name in held}
    assert not used & held and not {sha(name) for name in used} & held_shas
    assert white_copy not in used and pretrain["held_out"]["copies_under_other_names"] >= 1
    # Nothing else is lost: the same faces as the build without --hold-out, minus the held-out contents.
    assert used == {name for name in all_used if sha(name) not in held_shas}
    assert pretrain["held_out"]["faces_removed"] == sum(
        sha(name) in held_shas for name in os.listdir(folder) if name not in
        {entry["file"] for entry in everything["skipped"]})
    assert asian["split"]["test"] == len(held)


def test_validation_set_and_its_pretraining_set_hold_out_both_splits(source, tmp_path):
    """`make dataset-val`: the train faces of the build split again (validation = its test split), and an
    all-races set without the test faces and the validation faces."""
    build(source["folder"], tmp_path / "asian", race="asian", size=16, seed=SEED, progress=False)
    test_list = tmp_path / "asian" / "splits" / "test.txt"
    val = build(source["folder"], tmp_path / "val", race="asian", size=16, seed=SEED, progress=False,
                hold_out_lists=[test_list])
    val_list = tmp_path / "val" / "splits" / "test.txt"
    pretrain = build(source["folder"], tmp_path / "val" / "pretrain", race="all", size=16, seed=SEED,
                     progress=False, hold_out_lists=[test_list, val_list])

    def names(path):
        return set(path.read_text().splitlines())

    test, validation = names(test_list), names(val_list)
    asian_train = names(tmp_path / "asian" / "splits" / "train.txt")
    assert validation and validation <= asian_train
    assert names(tmp_path / "val" / "splits" / "train.txt") | validation == asian_train
    used = names(tmp_path / "val" / "pretrain" / "splits" / "train.txt") | \
        names(tmp_path / "val" / "pretrain" / "splits" / "test.txt")
    assert used and not used & (test | validation)
    assert pretrain["held_out"]["list"] == f"{test_list} + {val_list}"
    assert val["held_out"]["faces_removed"] >= len(test)


@pytest.mark.oracle
@pytest.mark.slow
def test_caffe_data_layer_reads_the_lmdb_and_mean(built, caffe_oracle, tmp_path):
    """Real Caffe's Data layer (mean_file in transform_param) reads the test LMDB in key order."""
    out, manifest = built
    n_test = manifest["split"]["test"]
    net = tmp_path / "read.prototxt"
    net.write_text(textwrap.dedent(f"""\
        name: "read"
        layer {{ name: "data" type: "Data" top: "data" top: "label"
          transform_param {{ mean_file: "{out / 'mean.binaryproto'}" }}
          data_param {{ source: "{out / 'lmdb' / 'age_test_lmdb'}" backend: LMDB batch_size: {n_test} }} }}
        """))
    script = textwrap.dedent(f"""\
        import numpy as np, caffe
        caffe.set_mode_cpu()
        net = caffe.Net("{net}", caffe.TEST)
        net.forward()
        np.save("{tmp_path / 'data.npy'}", net.blobs["data"].data)
        np.save("{tmp_path / 'label.npy'}", net.blobs["label"].data)
        """)
    env = {**os.environ, "PYTHONPATH": str(caffe_oracle["pythonpath"]), "GLOG_minloglevel": "2"}
    subprocess.run([str(caffe_oracle["python"]), "-c", script], check=True, env=env, capture_output=True,
                   timeout=120)
    records = records_of(out, "age_test_lmdb")
    mean = formats.read_mean(out / "mean.binaryproto")
    expected = np.stack([formats.datum_to_array(d).astype(np.float32) - mean for _, d in records])
    np.testing.assert_allclose(np.load(tmp_path / "data.npy"), expected, atol=1e-4)
    assert np.load(tmp_path / "label.npy").tolist() == [d.label for _, d in records]


def test_encoded_datums_decode_close_to_the_source(source, built, tmp_path):
    """--encoded: JPEG Datums (as Caffe's convert_imageset --encoded writes) that decode near the raw pixels."""
    out, manifest = built
    encoded = build(source["folder"], tmp_path / "encoded", race="all", size=SIZE, seed=SEED, encoded=True,
                    progress=False)
    assert encoded["classes"] == manifest["classes"] and encoded["config"]["datum"].startswith("JPEG")
    for lmdb_name in ("age_test_lmdb", "gender_train_lmdb"):
        raw = records_of(out, lmdb_name)
        jpeg = records_of(tmp_path / "encoded", lmdb_name)
        assert [key for key, _ in jpeg] == [key for key, _ in raw]
        for (key, exact), (_, lossy) in zip(raw, jpeg):
            assert lossy.encoded and lossy.label == exact.label
            difference = np.abs(formats.datum_to_array(lossy).astype(int) - formats.datum_to_array(exact))
            # JPEG keeps an original within a grey level or two, but smooths away part of a copy's noise
            assert difference.mean() < (3 if "~aug" not in key else 8), key
        assert sum(len(d.data) for _, d in jpeg) < sum(len(d.data) for _, d in raw) / 2
