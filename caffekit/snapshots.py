"""Caffe's snapshot file names, <prefix>_iter_<N>.caffemodel / .solverstate, built and read in one place.

A derived copy of a snapshot (the prior-corrected one, the one with the fixed layers) is named
<prefix>_<kind>_iter_<N>: still a snapshot name, so whoever looks for the newest snapshot finds it.
Torch-free: evaluation and compilation read these names too.
"""
import re
from pathlib import Path
from typing import Optional, Tuple

CAFFEMODEL = ".caffemodel"
SOLVERSTATE = ".solverstate"
_NAME = re.compile(r"(.+)_iter_(\d+)(\.caffemodel|\.solverstate)")


def snapshot_name(prefix, iteration: int, kind: Optional[str] = None, suffix: str = CAFFEMODEL) -> Path:
    """<prefix>_iter_<N><suffix>, or <prefix>_<kind>_iter_<N><suffix>; ``prefix`` may hold a folder."""
    stem = f"{prefix}_{kind}" if kind else str(prefix)
    return Path(f"{stem}_iter_{int(iteration)}{suffix}")


def parse_snapshot_name(path) -> Optional[Tuple[str, int]]:
    """(prefix, iteration) of a snapshot file, the prefix with the folder as given; None for other names."""
    path = Path(path)
    match = _NAME.fullmatch(path.name)
    if match is None:
        return None
    return str(path.with_name(match.group(1))), int(match.group(2))
