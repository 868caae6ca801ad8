"""Fetch the official UTKFace archive (aligned & cropped faces, UTKFace.tar.gz), check it, and unpack its images.

    python -m dataset.download --dest UTKFace
    python -m dataset.download --archive ~/Downloads/UTKFace.tar.gz --dest UTKFace   # a copy fetched by hand

The archive is hosted on Google Drive, linked from https://susanqq.github.io/UTKFace/ (file id below).
The authors publish no checksum, and this kit was written on a machine that cannot reach Google Drive, so
no sha256 of the official archive could be recorded here honestly. What is verified instead is the
archive's structure: a gzip tar whose members are regular files inside ``UTKFace/``, at least
MIN_IMAGES of them named like UTKFace images, nothing outside that folder (no absolute or ``..`` paths,
no links). Pass ``--sha256`` to also check a checksum you trust. UTKFace is for non-commercial research only.
"""
import argparse
import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from caffekit.atomic import atomic_path
from caffekit.errors import KitError, cli
from dataset import utkface

HOME_PAGE = "https://susanqq.github.io/UTKFace/"
DRIVE_FILE_ID = "0BxYys69jI14kYVM3aVhKS1VhRUk"  # "Aligned&Cropped Faces" UTKFace.tar.gz (about 107 MB)
URL = f"https://drive.usercontent.google.com/download?id={DRIVE_FILE_ID}&export=download&confirm=t"
MIN_IMAGES = 20_000  # the public archive holds 23,708
CHUNK = 1 << 20


def fetch(url: str, target: Path, dest: Path) -> None:
    manual = (f"download UTKFace.tar.gz (Aligned&Cropped Faces) from {HOME_PAGE} by hand and run "
              f"`python -m dataset.download --archive UTKFace.tar.gz --dest {dest}`, or put the "
              f"*.jpg.chip.jpg images in a folder and pass UTKFACE_DIR=<folder>")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as stream:
            if "text/html" in response.headers.get("Content-Type", ""):
                raise KitError(f"{url}: Google Drive answered with a web page, not the archive; {manual}")
            shutil.copyfileobj(response, stream, CHUNK)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise KitError(f"cannot download UTKFace ({reason}); {manual}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def image_members(archive: Path):
    """The archive's image members, after checking its structure (raises KitError)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise KitError(f"{archive}: not a readable .tar.gz archive ({exc})") from None
    images = []
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or parts[0] != "UTKFace":
            raise KitError(f"{archive}: member {member.name!r} lies outside UTKFace/, not the official archive")
        if member.isdir():
            continue
        if not member.isfile():
            raise KitError(f"{archive}: member {member.name!r} is a link or device, not the official archive")
        if len(parts) == 2 and utkface.parse_name(parts[1])[0] is not None:
            images.append(member)
    if len(images) < MIN_IMAGES:
        raise KitError(f"{archive}: {len(images)} UTKFace images, expected at least {MIN_IMAGES}")
    return images


def unpack(archive: Path, dest: Path, expected_sha256: str = "") -> int:
    """Verify ``archive`` and extract its images flat into ``dest`` (atomically); returns the image count."""
    if not archive.is_file():
        raise KitError(f"{archive}: archive not found")
    if expected_sha256 and sha256_of(archive) != expected_sha256.lower():
        raise KitError(f"{archive}: sha256 {sha256_of(archive)} does not match {expected_sha256}")
    images = image_members(archive)
    with atomic_path(dest) as tmp, tarfile.open(archive, "r:gz") as tar:
        tmp.mkdir()
        for member in images:
            with tar.extractfile(member) as source, open(tmp / Path(member.name).name, "wb") as target:
                shutil.copyfileobj(source, target, CHUNK)
    return len(images)


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", required=True, type=Path, help="folder to put the images in (UTKFACE_DIR)")
    parser.add_argument("--archive", type=Path, help="use this UTKFace.tar.gz instead of downloading it")
    parser.add_argument("--sha256", default="", help="also check the archive against this checksum")
    args = parser.parse_args(argv)
    if args.dest.is_dir() and any(args.dest.iterdir()):
        raise KitError(f"{args.dest}: already holds files; remove it first or pass another --dest")
    if args.archive:
        count = unpack(args.archive, args.dest, args.sha256)
    else:
        with tempfile.TemporaryDirectory(dir=args.dest.parent if args.dest.parent.is_dir() else None) as tmp:
            archive = Path(tmp) / "UTKFace.tar.gz"
            fetch(URL, archive, args.dest)
            count = unpack(archive, args.dest, args.sha256)
    print(f"{args.dest}: {count} UTKFace images (non-commercial research use only)")


if __name__ == "__main__":
    main()
