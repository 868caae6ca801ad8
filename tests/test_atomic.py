"""caffekit.atomic: outputs appear whole or not at all, and what a killed run leaves behind is removed by the next.

The kill tests stop a real tool at a known point (``start_paused``) and kill it there with a real signal, so
they do not depend on how fast the machine is."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from caffekit import atomic

REPO = Path(__file__).resolve().parents[1]

# Runs `python [-m] COMMAND...` with a profile hook that stops it, for good, at the Nth call of a function
# (a Python function by its code name, or a builtin such as a file's `write`), counting only calls made
# while a file matching a glob exists, and then says "paused" on stderr.
PAUSE_AT = r"""
import glob, runpy, sys, time
name, nth, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = 0

def pause(frame, event, arg):
    global seen
    called = frame.f_code.co_name if event == "call" else getattr(arg, "__name__", "") if event == "c_call" else ""
    if called == name and (not pattern or glob.glob(pattern)):
        seen += 1
        if seen == nth:
            sys.setprofile(None)
            print("paused", file=sys.stderr, flush=True)
            time.sleep(3600)

del sys.argv[:4]
sys.setprofile(pause)
if sys.argv[0] == "-m":
    del sys.argv[0]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def default_sigint():
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: give the child Ctrl-C's default, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_paused(command, at: str, nth: int = 1, while_exists: str = "", timeout: float = 600):
    """Start ``python COMMAND`` in the repository and return it (stderr piped) once it is stopped at the
    ``nth`` call of ``at`` made while a path matching the glob ``while_exists`` exists."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AT, at, str(nth), str(while_exists), *map(str, command)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    watchdog = threading.Timer(timeout, proc.kill)  # a hang fails the test instead of the suite
    watchdog.start()
    seen = []
    try:
        for line in proc.stderr:
            if line == "paused\n":
                return proc
            seen.append(line)
    finally:
        watchdog.cancel()
    proc.wait()
    pytest.fail(f"{command} ended (exit {proc.returncode}) before reaching {at} #{nth}:\n{''.join(seen)[-3000:]}")


def kill_9(proc) -> str:
    """SIGKILL, as `kill -9`; returns what the process wrote to stderr."""
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return stderr


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def hidden_leftovers(folder: Path):
    return sorted(path.name for path in folder.rglob(".*") if ".tmp-" in path.name or ".old-" in path.name)


# ---------------------------------------------------------------- the cleanup itself
def test_temporaries_of_dead_processes_are_removed_with_one_line_each_when_the_folder_is_written(tmp_path, capfd):
    pid = dead_pid()
    (tmp_path / f".a.caffemodel.tmp-{pid}").write_bytes(b"half")
    (tmp_path / f".b_lmdb.tmp-{pid}").mkdir()
    (tmp_path / f".b_lmdb.tmp-{pid}" / "data.mdb").write_bytes(b"x" * 100)
    (tmp_path / "FP16").mkdir()
    (tmp_path / f".FP16.old-{pid}").mkdir()  # moved aside, and the new folder did get renamed in
    atomic.write_text(tmp_path / "new.txt", "new\n")
    assert sorted(os.listdir(tmp_path)) == ["FP16", "new.txt"]
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 3
    for name, line in zip([f".FP16.old-{pid}", f".a.caffemodel.tmp-{pid}", f".b_lmdb.tmp-{pid}"], lines):
        assert line.startswith(f"removed {tmp_path / name}: ") and f"process {pid}" in line


def test_temporaries_of_live_processes_and_other_hidden_files_are_kept(tmp_path, capfd):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        kept = [f".being_written.tmp-{sleeper.pid}", f".mine.tmp-{os.getpid()}", ".notes.tmp-abc", ".tmp-1",
                ".bashrc", f"visible.tmp-{dead_pid()}", ".group.tmp-0", f".huge.tmp-{2 ** 70}"]
        for name in kept:
            (tmp_path / name).write_text("keep")
        atomic.write_text(tmp_path / "new.txt", "new\n")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["new.txt"])
    assert capfd.readouterr().err == ""


def test_a_folder_moved_aside_by_a_killed_process_is_put_back_when_its_target_is_missing(tmp_path, capfd):
    pid = dead_pid()
    (tmp_path / f".FP32.old-{pid}").mkdir()
    (tmp_path / f".FP32.old-{pid}" / "age_net.xml").write_text("<net/>")
    atomic.write_text(tmp_path / "other.txt", "x")
    assert (tmp_path / "FP32" / "age_net.xml").read_text() == "<net/>"
    assert not (tmp_path / f".FP32.old-{pid}").exists()
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith(f"restored {tmp_path / 'FP32'} from .FP32.old-{pid}")


# ---------------------------------------------------------------- real tools killed with SIGKILL
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from dataset.demo import write_demo

    folder = tmp_path_factory.mktemp("faces") / "utkface"
    write_demo(folder, count=40)
    return folder


def test_a_build_killed_with_sigkill_keeps_its_work_aside_and_the_rerun_resumes_and_clears_it(faces, tmp_path):
    out = tmp_path / "data"
    build = ["-m", "dataset.build", "--utkface", faces, "--out", out, "--size", "64"]
    # Stopped as the second LMDB is done: the first is committed in the unfinished build's folder.
    proc = start_paused(build, "lmdb_done", nth=2)
    kill_9(proc)
    assert (out / ".partial-build" / "progress.json").is_file()
    assert not (out / "manifest.json").exists() and not (out / "lmdb").exists()  # no output under its own name

    again = subprocess.run([sys.executable, *map(str, build)], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming the unfinished build" in again.stdout + again.stderr
    assert not (out / ".partial-build").exists() and hidden_leftovers(out) == []
    assert (out / "manifest.json").is_file() and (out / "lmdb" / "age_train_lmdb" / "data.mdb").is_file()


@pytest.mark.slow
def test_training_killed_with_sigkill_mid_snapshot_leaves_a_temporary_that_resume_removes(tmp_path):
    from test_train import TINY_NET
    from train_fixtures import make_dataset, small_solver

    data = make_dataset(tmp_path / "data", None, train=16, test=4, size=64)
    net = tmp_path / "tiny.prototxt"
    net.write_text(TINY_NET)
    solver = small_solver(tmp_path / "solver.prototxt", net=str(net), max_iter=6, snapshot=3, display=0)
    out = tmp_path / "models" / "age_net"
    train = ["scripts/train.py", "--backend", "torch", "--no-progress", "--net", "age", "--data-dir", data,
             "--models-dir", tmp_path / "models", "--solver", solver]
    # Stopped inside the write of the second snapshot's caffemodel: its temporary exists, empty.
    proc = start_paused(train, "write", nth=2, while_exists=out / ".age_net_iter_*.caffemodel.tmp-*")
    kill_9(proc)
    left = f".age_net_iter_6.caffemodel.tmp-{proc.pid}"
    assert hidden_leftovers(out) == [left] and (out / left).stat().st_size == 0

    resumed = subprocess.run([sys.executable, *map(str, train), "--resume", out / "age_net_iter_3.solverstate"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert hidden_leftovers(out) == []
    assert f"removed {out / left}: a temporary left by process {proc.pid}, which no longer runs" in \
        resumed.stderr.splitlines()
    assert (out / "age_net_iter_6.caffemodel").stat().st_size > 0
