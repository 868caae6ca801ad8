"""The unfinished work of a build, kept in ``<out>/.partial-build/`` so that a rerun resumes after Ctrl-C or a kill.

    progress.json   the inputs' fingerprint, the configuration, and per stage what is committed
    checks.jsonl    the image check of each candidate file, in candidate order, one JSON line each
    lmdb/*_lmdb     the LMDBs being written, committed in chunks in key order
    *_sum.npy       the exact pixel sums of a mean so far

A rerun of the same command (same inputs, same options: the same fingerprint) continues after what was
committed: the checks after the last complete line, each LMDB after its last committed key, each mean after
its last saved block. Other inputs or options: the folder is removed and the build starts over, saying why.
Everything a stage makes is a pure function of the fingerprinted inputs and of the record's place, so a
resumed build writes the same records as one that ran in one go. The finished outputs are moved into place
only when all are complete (dataset/build.py), and the folder is then removed.

The folder is not a ``.tmp-<pid>`` temporary: the next run must keep it, not clean it up. A lock on
progress.json keeps two builds from writing one folder at once.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from caffekit import atomic
from caffekit.errors import KitError

FOLDER = ".partial-build"
FORMAT = 1  # bumped whenever what a stage writes changes, so that an older unfinished build is not continued


def fingerprint(config: dict, folder: Path, faces: Sequence) -> str:
    """sha256 of the options and of every candidate: its labels, and its file's size and modification time
    (reading every file to hash it would cost as much as checking it)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "config": config}, sort_keys=True).encode())
    for face in faces:
        try:
            stat = os.stat(folder / face.name)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1  # the check will report it
        digest.update(json.dumps([face.name, face.age, face.gender, face.race, face.age_class, face.fold,
                                  size, mtime]).encode() + b"\n")
    return digest.hexdigest()


def _differences(old: dict, new: dict) -> str:
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    return ", ".join(changed) if changed else "the input files changed"


class Partial:
    """One build's unfinished work; ``Partial.open`` resumes it or starts it over."""

    def __init__(self, out: Path, fingerprint_: str, config: dict):
        self.folder = Path(out) / FOLDER
        self.progress = {"format": FORMAT, "fingerprint": fingerprint_, "config": config, "lmdbs": {}, "means": {}}
        self.resumed = False
        self._lock = None

    # ------------------------------------------------------------ opening, saving, removing
    @classmethod
    def open(cls, out: Path, fingerprint_: str, config: dict) -> "Partial":
        partial = cls(out, fingerprint_, config)
        try:
            partial.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KitError(f"{partial.folder}: cannot create folder ({exc.strerror})") from None
        partial._take_lock()
        old = partial._read()
        if old is None:
            if any(name != "lock" for name in os.listdir(partial.folder)):
                print(f"starting over: {partial.folder} holds no readable progress.json", file=sys.stderr)
                partial._clear()
        elif old.get("fingerprint") != fingerprint_ or old.get("format") != FORMAT:
            print(f"starting over: {partial.folder} held an unfinished build of other inputs or options "
                  f"({_differences(old.get('config', {}), config)})", file=sys.stderr)
            partial._clear()
        else:
            partial.progress = old
            partial.resumed = True
        partial.save()
        return partial

    def _take_lock(self) -> None:
        # lockf (POSIX record locks), not flock: a lock that worker processes would not inherit, released
        # when this process ends however it ends.
        self._lock = open(self.folder / "lock", "a")
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise KitError(f"{self.folder.parent}: another build is writing there now (wait for it, or stop it)") \
                from None

    def _read(self) -> Optional[dict]:
        try:
            return json.loads((self.folder / "progress.json").read_text())
        except (OSError, ValueError):
            return None

    def _clear(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def save(self) -> None:
        atomic.write_text(self.folder / "progress.json", json.dumps(self.progress, indent=1) + "\n")

    def remove(self) -> None:
        """The build is complete (or its inputs are wrong): nothing to resume."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def records_committed(self) -> int:
        return sum(state["records"] for state in self.progress["lmdbs"].values())

    def summary(self) -> str:
        """What a resume will not redo, for the messages."""
        lmdbs = self.progress["lmdbs"].values()
        done = sum(state["output"] is not None for state in lmdbs)
        return f"{self.records_committed()} records committed, {done} LMDBs complete"

    # ------------------------------------------------------------ the image checks
    def read_checks(self, names: Sequence[str]) -> List[list]:
        """The checks already made, ``[name, sha256, ok, reason]`` of the first candidates (an incomplete last
        line, cut by a kill, is dropped; a line of another name ends the list)."""
        done = []
        with contextlib.suppress(OSError):
            with open(self.folder / "checks.jsonl") as stream:
                for line, name in zip(stream, names):
                    try:
                        entry = json.loads(line) if line.endswith("\n") else None
                    except ValueError:
                        entry = None
                    if not entry or entry[0] != name:
                        break
                    done.append(entry)
        return done

    @contextlib.contextmanager
    def append_checks(self, keep: int):
        """A function writing one check a line after the first ``keep`` (the file is cut to those)."""
        path = self.folder / "checks.jsonl"
        lines = path.read_text().splitlines(keepends=True)[:keep] if path.exists() and keep else []
        with open(path, "w") as stream:
            stream.writelines(lines)

            def keep(entry: list) -> list:
                stream.write(json.dumps(entry) + "\n")
                return entry

            yield keep

    # ------------------------------------------------------------ LMDBs
    def lmdb_path(self, relative: str) -> Path:
        return self.folder / relative

    def lmdb_state(self, relative: str, total: int) -> dict:
        state = self.progress["lmdbs"].setdefault(relative, {"records": 0, "last_key": "", "total": total,
                                                             "output": None})
        return state

    def restart_lmdb(self, relative: str, why: str) -> None:
        print(f"starting {relative} over: {why}", file=sys.stderr)
        shutil.rmtree(self.lmdb_path(relative), ignore_errors=True)
        self.progress["lmdbs"][relative].update(records=0, last_key="", output=None)
        self.save()

    def committed(self, relative: str, records: int, last_key: bytes) -> None:
        self.progress["lmdbs"][relative].update(records=records, last_key=last_key.decode())
        self.save()

    def lmdb_done(self, relative: str, output: dict) -> None:
        self.progress["lmdbs"][relative]["output"] = output
        self.save()

    # ------------------------------------------------------------ means (exact integer pixel sums)
    def mean_sum(self, name: str, shape) -> tuple:
        """(sum so far, images summed) of the mean ``name``."""
        state = self.progress["means"].setdefault(name, {"images": 0})
        path = self.folder / f"{name}_sum.npy"
        if state["images"] and path.exists():
            total = np.load(path)
            if total.shape == tuple(shape):
                return total, state["images"]
        state["images"] = 0
        return np.zeros(shape, np.uint64), 0

    def save_mean_sum(self, name: str, total: np.ndarray, images: int) -> None:
        with atomic.atomic_path(self.folder / f"{name}_sum.npy") as tmp:
            with open(tmp, "wb") as stream:
                np.save(stream, total, allow_pickle=False)
        self.progress["means"][name]["images"] = images
        self.save()

