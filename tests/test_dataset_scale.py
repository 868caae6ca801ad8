"""The build at scale (dataset/pool.py, dataset/partial.py): worker processes, bounded memory, JPEG by default for
big sets, and a build interrupted (Ctrl-C, kill -9) and rerun that writes the same records as one run in one go."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from caffekit import formats
from dataset import build as build_module
from dataset import lmdb_io, partial, pool, utkface
from dataset.build import BuildInterrupted, ImageJobs, build, choose_datum
from dataset.lmdb_io import read_records
from test_atomic import default_sigint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 48
SEED = 5


@pytest.fixture(scope="module")
def faces(utkface_dir, tmp_path_factory):
    """150 real UTKFace files, every age bin."""
    folder = tmp_path_factory.mktemp("faces")
    names = [name for name in sorted(os.listdir(utkface_dir)) if utkface.parse_name(name)[0] is not None]
    for name in names[::len(names) // 150][:150]:
        shutil.copyfile(utkface_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reference(faces, tmp_path_factory):
    """The build in one go, in this process (1 worker)."""
    out = tmp_path_factory.mktemp("reference") / "data"
    return out, build(faces, out, race="all", size=SIZE, seed=SEED, workers=1, progress=False)


def all_records(out):
    """Every LMDB's records, (key, value) in key order: what must be byte-identical."""
    return {path.name: list(read_records(path)) for path in sorted((out / "lmdb").iterdir())}


def test_one_and_two_worker_processes_write_identical_records(faces, reference, tmp_path, monkeypatch):
    out, manifest = reference
    monkeypatch.setattr(lmdb_io, "TXN_BYTES", 100_000)  # commits by size too, and the map reopened after each
    two = build(faces, tmp_path / "two", race="all", size=SIZE, seed=SEED, workers=2, progress=False,
                commit_every=5)
    assert two["outputs"] == manifest["outputs"]
    assert all_records(tmp_path / "two") == all_records(out)
    assert not (tmp_path / "two" / partial.FOLDER).exists()


def test_in_flight_records_are_bounded_whatever_the_set_size():
    """The streaming map pulls a job only when the caller has consumed enough results: at most ``in_flight``
    jobs are queued, in the workers or done and unread, so a 500k-image build holds as few as a small one."""
    for workers, in_flight in ((2, 32), (2, 5), (1, 1)):
        pulled = consumed = peak = 0

        def jobs():
            nonlocal pulled
            for number in range(-1000, 0):
                pulled += 1
                yield number

        with pool.ordered_map(workers, in_flight=in_flight) as imap:
            results = []
            for result in imap(abs, jobs(), batch=8):
                peak = max(peak, pulled - consumed)
                consumed += 1
                results.append(result)
        assert results == list(range(1000, 0, -1))  # in job order
        assert peak <= in_flight, (workers, in_flight, peak)


def interrupt_after(monkeypatch, records: int):
    """Ctrl-C (as KeyboardInterrupt) in the middle of the LMDB stage, after ``records`` records were made."""
    made = {"n": 0}
    original = ImageJobs.record

    def record(self, job):
        made["n"] += 1
        if made["n"] > records:
            raise KeyboardInterrupt
        return original(self, job)

    monkeypatch.setattr(ImageJobs, "record", record)
    return made


def test_a_resumed_build_makes_only_the_records_not_committed(faces, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    interrupt_after(monkeypatch, 250)
    with pytest.raises(BuildInterrupted, match="records committed"):
        build(faces, out, race="all", size=SIZE, seed=SEED, workers=1, progress=False, commit_every=16)
    progress = json.loads((out / partial.FOLDER / "progress.json").read_text())
    committed = sum(state["records"] for state in progress["lmdbs"].values())
    assert 250 - 16 < committed <= 250 and not (out / "manifest.json").exists()
    monkeypatch.undo()

    made = interrupt_after(monkeypatch, 10 ** 9)
    resumed = build(faces, out, race="all", size=SIZE, seed=SEED, workers=1, progress=False, commit_every=16)
    total = sum(output["records"] for relative, output in resumed["outputs"].items() if relative.startswith("lmdb/"))
    assert made["n"] == total - committed  # nothing committed was made again
    assert f"resuming the unfinished build in {out / partial.FOLDER} ({committed} records committed" in \
        capsys.readouterr().err
    assert resumed["outputs"] == reference[1]["outputs"]
    assert all_records(out) == all_records(reference[0])
    assert not (out / partial.FOLDER).exists()


def test_changed_options_start_over_and_say_so(faces, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    interrupt_after(monkeypatch, 100)
    with pytest.raises(BuildInterrupted):
        build(faces, out, race="all", size=SIZE, seed=SEED, workers=1, progress=False, commit_every=16)
    monkeypatch.undo()
    capsys.readouterr()
    other = build(faces, out, race="all", size=SIZE, seed=SEED + 1, workers=1, progress=False, commit_every=16)
    err = capsys.readouterr().err
    assert f"starting over: {out / partial.FOLDER} held an unfinished build of other inputs or options " \
           f"(seed {SEED} -> {SEED + 1})" in err and "resuming" not in err
    fresh = build(faces, tmp_path / "fresh", race="all", size=SIZE, seed=SEED + 1, workers=1, progress=False)
    assert other["outputs"] == fresh["outputs"]


def test_a_mean_interrupted_halfway_goes_on_from_its_saved_sums(faces, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "MEAN_SAVE_IMAGES", 64)  # a save after every chunk of 64 images
    calls = {"n": 0}
    original = ImageJobs.pixel_sum

    def pixel_sum(self, names_size):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the mean's second chunk
        return original(self, names_size)

    monkeypatch.setattr(ImageJobs, "pixel_sum", pixel_sum)
    out = tmp_path / "data"
    with pytest.raises(BuildInterrupted):
        build(faces, out, race="all", size=SIZE, seed=SEED, workers=1, progress=False)
    assert json.loads((out / partial.FOLDER / "progress.json").read_text())["means"]["mean"]["images"] == 64
    calls["n"] = 10
    resumed = build(faces, out, race="all", size=SIZE, seed=SEED, workers=1, progress=False)
    chunks = -(-reference[1]["mean"]["images"] // 64)
    assert calls["n"] - 10 == (chunks - 1) + chunks  # the mean's other chunks, then the joint mean's
    assert resumed["outputs"] == reference[1]["outputs"]


def build_command(faces, out, *extra):
    return [sys.executable, "-m", "dataset.build", "--input", str(faces), "--out", str(out), "--race", "all",
            "--size", str(SIZE), "--seed", str(SEED), "--workers", "2", "--chunk", "4", *extra]


def committed_records(out) -> int:
    try:
        progress = json.loads((out / partial.FOLDER / "progress.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(state["records"] for state in progress["lmdbs"].values() if state["output"] is None)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_build_stopped_in_the_middle_resumes_to_identical_records(sig, faces, reference, tmp_path):
    out = tmp_path / "data"
    command = build_command(faces, out)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while committed_records(out) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # an LMDB half written: some chunks committed, more to come
    if process.poll() is not None:
        pytest.fail(f"the build ended (exit {process.returncode}) before it could be stopped")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
        (line,) = stderr.strip().splitlines()  # one line, no traceback from the process or its workers
        assert line.startswith("interrupted: ") and line.endswith("; rerun the same command to resume"), line
        assert "records committed" in line and str(out / partial.FOLDER) in line
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and not (out / "lmdb").exists()
    committed = json.loads((out / partial.FOLDER / "progress.json").read_text())
    assert sum(state["records"] for state in committed["lmdbs"].values()) >= 8

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming the unfinished build in {out / partial.FOLDER}" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"] == reference[1]["outputs"]
    assert all_records(out) == all_records(reference[0])
    assert not (out / partial.FOLDER).exists()


def test_jpeg_by_default_above_the_raw_limit_and_flags_override(faces, tmp_path, monkeypatch):
    assert choose_datum(None, 20_000_000_000) == (False, "the raw records would take 20.0 GB, within the 20 GB "
                                                         "limit for raw (--encoded overrides)")
    assert choose_datum(None, 20_100_000_000)[0] is True
    assert choose_datum(True, 1) == (True, "--encoded given") and choose_datum(False, 10 ** 12) == (False, "--raw given")
    small = build(faces, tmp_path / "small", race="all", size=SIZE, seed=SEED, workers=1, progress=False,
                  joint_size=0)
    assert small["config"]["datum"] == "raw uint8 BGR CHW" and "within the 20 GB" in small["config"]["datum_choice"]
    monkeypatch.setattr(build_module, "RAW_LIMIT_BYTES", 1e6)  # as if this set were IMDB-WIKI's size
    big = build(faces, tmp_path / "big", race="all", size=SIZE, seed=SEED, workers=1, progress=False, joint_size=0)
    assert big["config"]["datum"].startswith("JPEG") and "above the 0.001 GB limit" in big["config"]["datum_choice"]
    for lmdb_name in ("age_train_lmdb", "gender_test_lmdb"):
        assert all(formats.parse_datum(value).encoded for _, value in
                   read_records(tmp_path / "big" / "lmdb" / lmdb_name))
    forced = build(faces, tmp_path / "forced", race="all", size=SIZE, seed=SEED, encoded=False, workers=1,
                   progress=False, joint_size=0)
    assert forced["config"]["datum_choice"] == "--raw given" and forced["outputs"] == small["outputs"]
