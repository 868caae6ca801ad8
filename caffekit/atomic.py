"""Write files and folders under a temporary name, renamed into place when complete.

An interrupted run therefore leaves either the old output or the new one, never a
half-written file: the temporary sits beside the target (same file system, so the
rename is atomic) and is removed on any failure.
"""
import contextlib
import os
import shutil
from pathlib import Path

from caffekit.errors import KitError


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
