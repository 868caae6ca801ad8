"""The dataset CLIs as a user runs them: good and bad input, one-line errors, nothing partial left behind.

These use the synthetic demo set (dataset/demo.py), so they run without the UTKFace images."""
import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pytest

from caffekit.errors import KitError
from dataset import download
from dataset.demo import write_demo
from dataset.lmdb_io import lmdb_hash
from test_atomic import start_paused

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def build_cli(source, out, size=32, *extra):
    return run("dataset.build", "--utkface", source, "--out", out, "--race", "asian", "--size", size,
               "--test-fraction", "0.2", "--seed", "1", *extra)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert str(word) in lines[0], lines[0]


def nothing_left(path):
    return not path.exists()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "utkface"
    write_demo(folder, count=90)
    return folder


def test_demo_set_is_deterministic_and_covers_every_class(demo_dir, tmp_path):
    names = sorted(os.listdir(demo_dir))
    assert len(names) == 90
    again = tmp_path / "again"
    write_demo(again, count=30)  # the same seed draws the same first images
    assert set(os.listdir(again)) < set(names)
    assert all((again / n).read_bytes() == (demo_dir / n).read_bytes() for n in os.listdir(again))
    labels = collections.Counter((min(int(n.split("_")[0]) // 10, 8), int(n.split("_")[1])) for n in names)
    assert set(labels) == {(b, g) for b in range(9) for g in (0, 1)}
    assert len(set(labels.values())) > 1  # unbalanced, so a demo build oversamples
    assert {n.split("_")[2] for n in names} == {"2"}
    image = cv2.imread(str(demo_dir / names[0]))
    assert image.shape == (200, 200, 3)
    with pytest.raises(KitError, match="not a demo image folder"):
        write_demo(tmp_path, count=90)  # holds "again", not demo images: never replaced


def test_build_cli_prints_class_tables_and_writes_everything(demo_dir, tmp_path):
    out = tmp_path / "data"
    result = build_cli(demo_dir, out)
    assert result.returncode == 0, result.stderr
    for words in ("train+oversampled", "0-9", "80+", "Male", "Female", "total"):
        assert words in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == {**manifest["config"], "race": "asian", "size": 32, "test_fraction": 0.2, "seed": 1}
    assert manifest["skipped"] == []
    for name in ("age_train", "age_test", "gender_train", "gender_test"):
        assert lmdb_hash(out / "lmdb" / f"{name}_lmdb") == manifest["outputs"][f"lmdb/{name}_lmdb"]
    for name in ("mean.binaryproto", "mean.npy", "age_test.csv", "gender_test.csv", "splits/train.txt"):
        assert (out / name).is_file()


def test_bad_files_are_skipped_and_named_while_the_build_goes_on(demo_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(demo_dir):
        (source / name).write_bytes((demo_dir / name).read_bytes())
    good = (source / sorted(os.listdir(source))[0]).read_bytes()
    bad = {"40_0_2_29990101000000001.jpg.chip.jpg": good[:-200],  # corrupt: cut short
           "41_0_2_29990101000000002.jpg.chip.jpg": b"",
           "42_1_2_29990101000000003.jpg.chip.jpg": b"GIF89a not really\n",
           "readme.md": b"# not an image\n"}
    for name, data in bad.items():
        (source / name).write_bytes(data)
    out = tmp_path / "data"
    result = build_cli(source, out)
    assert result.returncode == 0, result.stderr
    skipped = {entry["file"]: entry["reason"] for entry in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert set(skipped) == set(bad)
    assert "truncated" in skipped["40_0_2_29990101000000001.jpg.chip.jpg"]
    assert "zero-byte" in skipped["41_0_2_29990101000000002.jpg.chip.jpg"]
    assert "not a readable image" in skipped["42_1_2_29990101000000003.jpg.chip.jpg"]
    assert "3 skipped" not in result.stdout and "4 skipped" in result.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "only-bad", "no-such-race"])
def test_bad_source_folders_fail_with_one_line_and_leave_nothing(case, tmp_path, demo_dir):
    source = tmp_path / "utkface"
    words = [source]
    if case != "missing":
        source.mkdir()
    if case == "empty":
        words.append("empty")
    if case == "only-bad":
        (source / "30_0_2_29990101000000001.jpg.chip.jpg").write_bytes(b"")
        (source / "31_1_2_29990101000000002.jpg.chip.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
        words += ["no usable", "zero-byte", "30_0_2_29990101000000001.jpg.chip.jpg", "truncated JPEG"]
    if case == "no-such-race":
        name = sorted(os.listdir(demo_dir))[0]
        (source / name.replace("_2_", "_0_", 1)).write_bytes((demo_dir / name).read_bytes())
        words += ["no usable asian image", "1 of other races"]
    out = tmp_path / "data"
    result = build_cli(source, out)
    assert_one_line_error(result, *words)
    assert nothing_left(out)


@pytest.mark.parametrize("case", ["missing", "empty", "other folder"])
def test_bad_hold_out_list_fails_with_one_line_and_leaves_nothing(case, demo_dir, tmp_path):
    listing = tmp_path / "test.txt"
    if case == "empty":
        listing.write_text("\n")
    elif case == "other folder":
        listing.write_text("1_0_2_20990101000000000.jpg.chip.jpg\n")
    out = tmp_path / "pretrain"
    words = {"missing": "cannot read", "empty": "empty", "other folder": "none of the 1 file names listed"}[case]
    assert_one_line_error(build_cli(demo_dir, out, 32, "--hold-out", listing), listing, words)
    assert nothing_left(out)


def test_too_few_images_to_split_is_an_error(demo_dir, tmp_path):
    source = tmp_path / "two"
    source.mkdir()
    for name in sorted(os.listdir(demo_dir))[:2]:
        (source / name).write_bytes((demo_dir / name).read_bytes())
    out = tmp_path / "data"
    assert_one_line_error(build_cli(source, out), "too few to split")
    assert nothing_left(out)


def test_unwritable_out_fails_with_one_line_and_leaves_nothing(demo_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "data"
    assert_one_line_error(build_cli(demo_dir, out), out, "not a folder")
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes through permissions, so this half needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(build_cli(demo_dir, locked / "data"), "not writable")
        assert list(locked.iterdir()) == []


def test_interrupted_build_keeps_its_work_for_the_rerun_and_no_output(demo_dir, tmp_path):
    out = tmp_path / "data"
    command = ["-m", "dataset.build", "--utkface", demo_dir, "--out", out, "--size", "64"]
    # Stopped as it starts its second LMDB, with the first complete in the partial build: Ctrl-C there.
    process = start_paused(command, "write_lmdb", nth=2)
    assert sorted(path.name for path in (out / ".partial-build" / "lmdb").iterdir()) == ["age_train_lmdb"]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("interrupted: ") and line.endswith("; rerun the same command to resume"), line
    assert os.listdir(out) == [".partial-build"]  # no output appears before all are complete

    again = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming the unfinished build" in again.stderr and "1 LMDBs complete" in again.stderr
    assert ".partial-build" not in os.listdir(out) and (out / "manifest.json").is_file()


def test_failed_build_keeps_the_previous_outputs(demo_dir, tmp_path):
    out = tmp_path / "data"
    assert build_cli(demo_dir, out).returncode == 0
    before = (out / "manifest.json").read_bytes()
    assert_one_line_error(build_cli(tmp_path / "missing", out), "not found")
    assert (out / "manifest.json").read_bytes() == before


def test_download_offline_fails_with_one_line_saying_where_to_put_images(tmp_path):
    # A proxy on a closed local port makes the download fail at once, as it does with no network.
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    dest = tmp_path / "UTKFace"
    result = run("dataset.download", "--dest", dest, env=env)
    assert_one_line_error(result, "cannot download UTKFace", "susanqq.github.io/UTKFace", "--archive", dest,
                          "UTKFACE_DIR")
    assert nothing_left(dest)


def make_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, source in members.items():
            tar.add(source, arcname=name)


def test_download_unpacks_a_checked_archive_flat(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "MIN_IMAGES", 50)  # the real archive holds 23,708; this one 90
    names = sorted(os.listdir(demo_dir))
    archive = tmp_path / "UTKFace.tar.gz"
    make_archive(archive, {f"UTKFace/{name}": demo_dir / name for name in names})
    dest = tmp_path / "images"
    assert download.unpack(archive, dest, download.sha256_of(archive)) == 90
    assert sorted(os.listdir(dest)) == names
    with pytest.raises(KitError, match="does not match"):
        download.unpack(archive, tmp_path / "other", "0" * 64)
    assert nothing_left(tmp_path / "other")


@pytest.mark.parametrize("members, words", [
    ({"UTKFace/../evil.jpg": None}, "outside UTKFace/"),
    ({"elsewhere/x.jpg": None}, "outside UTKFace/"),
    ({}, "0 UTKFace images"),
])
def test_download_rejects_archives_that_are_not_utkface(members, words, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "MIN_IMAGES", 1)
    one = demo_dir / sorted(os.listdir(demo_dir))[0]
    archive = tmp_path / "UTKFace.tar.gz"
    make_archive(archive, {name: one for name in members} or {"UTKFace/notes.txt": one})
    with pytest.raises(KitError, match=words):
        download.unpack(archive, tmp_path / "dest", "")
    assert nothing_left(tmp_path / "dest")


def test_download_rejects_a_file_that_is_not_an_archive(tmp_path):
    archive = tmp_path / "UTKFace.tar.gz"
    archive.write_bytes(np.arange(1000, dtype=np.uint8).tobytes())
    result = run("dataset.download", "--archive", archive, "--dest", tmp_path / "dest")
    assert_one_line_error(result, archive, "not a readable .tar.gz")


def test_make_dataset_val_holds_out_the_test_split_then_both_splits():
    """`make dataset-val` wiring: the RACE faces without data's test split, then all races without it and without
    the new validation split (the builder's side is tested in test_dataset_build)."""
    if not shutil.which("make"):
        pytest.skip("make is not on PATH")
    result = subprocess.run(["make", "--no-print-directory", "-n", "dataset-val", "UTKFACE_DIR=faces", "DATA_DIR=d",
                             "PY=python"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first, second = [shlex.split(line) for line in result.stdout.replace("\\\n", " ").splitlines()]
    assert first[:3] == second[:3] == ["python", "-m", "dataset.build"]
    assert " ".join(first[3:]).endswith("--out d/val --race asian --test-fraction 0.2 --hold-out d/splits/test.txt")
    assert " ".join(second[3:]).endswith("--out d/val/pretrain --race all --test-fraction 0.05 "
                                         "--hold-out d/splits/test.txt d/val/splits/test.txt")
