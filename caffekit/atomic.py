"""Write files and folders under a temporary name, renamed into place when complete.

An interrupted run therefore leaves either the old output or the new one, never a
half-written file: the temporary sits beside the target (same file system, so the
rename is atomic) and is removed on any failure. A run killed outright (kill -9, power
loss) cannot remove its temporaries, so the next write into the same folder removes those
of processes that no longer exist.
"""
import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

from caffekit.errors import KitError


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ".<target name>.tmp-<pid>" (being written) and ".<target name>.old-<pid>" (a folder moved aside).
LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _dead(pid: int) -> bool:
    """Whether no process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process; no pid at all
        pass
    return False


def remove_stale_temporaries(folder) -> None:
    """Remove the temporaries that dead processes left in ``folder``, with one line on stderr each. A live
    writer's are kept, this process's included. An old folder whose target is missing was moved aside just
    before the kill: it is put back, not lost."""
    folder = Path(folder)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        match = LEFTOVER.match(name)
        if not match or int(match["pid"]) == os.getpid() or not _dead(int(match["pid"])):
            continue
        path, target, pid = folder / name, folder / match["target"], match["pid"]
        try:
            if match["kind"] == "old" and not os.path.lexists(target):
                os.replace(path, target)
                print(f"restored {target} from {name}, left by process {pid}, which was killed while "
                      "replacing it", file=sys.stderr)
            else:
                _remove(path)
                print(f"removed {path}: a temporary left by process {pid}, which no longer runs", file=sys.stderr)
        except OSError:  # another run cleaning up at the same time got there first
            continue


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path to write ``target`` to (a file or a folder)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KitError(f"{target.parent}: cannot create folder ({exc.strerror})") from None
    if not os.access(target.parent, os.W_OK):
        raise KitError(f"{target.parent}: folder is not writable")
    remove_stale_temporaries(target.parent)
    tmp = _temporary_name(target)
    _remove(tmp)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            # os.replace cannot swap a folder over a non-empty folder: move the
            # old one aside first so a failure here still leaves one of them.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(target, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
