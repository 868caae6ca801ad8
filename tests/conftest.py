"""Shared test fixtures: paths to the shared UTKFace copy and the Caffe oracle."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UTKFACE_DIR = REPO.parent / "shared" / "data" / "utkface"
ORACLE_HOME = Path(os.environ.get("CAFFE_ORACLE_HOME", Path.home() / ".cache" / "caffe-oracle"))


@pytest.fixture(scope="session")
def utkface_dir() -> Path:
    """The shared UTKFace copy (../shared/data/utkface), or a skip saying it is absent."""
    if not UTKFACE_DIR.is_dir() or not any(UTKFACE_DIR.iterdir()):
        pytest.skip(f"UTKFace images not found at {UTKFACE_DIR} (../shared/data/utkface)")
    return UTKFACE_DIR


@pytest.fixture(scope="session")
def caffe_oracle() -> dict:
    """Paths of the real Caffe build, or a skip saying how to build it."""
    caffe = ORACLE_HOME / "caffe" / "bin" / "caffe"
    if not caffe.is_file():
        pytest.skip(f"real Caffe oracle not built at {ORACLE_HOME} (run `make oracle`)")
    return {
        "home": ORACLE_HOME,
        "caffe": caffe,
        "bin": ORACLE_HOME / "caffe" / "bin",
        "python": ORACLE_HOME / "venv" / "bin" / "python",
        "pythonpath": ORACLE_HOME / "caffe" / "python",
    }
