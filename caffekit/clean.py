"""Delete folders the kit wrote, and only those (`make clean` passes DATA_DIR, MODELS_DIR and DEMO_DIR).

    python -m caffekit.clean data models demo

A folder is deleted only if it carries the kit's mark: a dataset's manifest.json (dataset.build), the
demo's marker file (scripts/demo.py), a models folder's layout (<net>_net folders that training or
evaluation wrote, ir/ from compile_ir.py, models folders nested in it such as pretrain/, and the summary
of `make evaluate-folds`), or a folder of datasets only (`make evaluate-folds` puts one per fold in
DATA_DIR). If any folder named lacks the mark, nothing is deleted: a mistyped variable must not cost a
folder of one's own.
Folders that do not exist are skipped.
"""
import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from caffekit import models
from caffekit.errors import KitError, cli

DEMO_MARKER = ".agegender-kit-demo"
NETS = tuple(model.name for model in models.MODELS.values())  # the folders training and compiling write
MANIFEST_KEYS = {"config", "outputs", "classes"}  # what every manifest.json of dataset.build holds
FOLDS_SUMMARY_KEYS = {"folds", "per_fold", "summary"}  # what scripts/evaluate_folds.py --out writes


def _visible(folder: Path):
    return [entry for entry in folder.iterdir() if not entry.name.startswith(".")]


def _json_with(path: Path, keys) -> bool:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and keys <= content.keys()


def _is_dataset(folder: Path) -> bool:
    return _json_with(folder / "manifest.json", MANIFEST_KEYS)


def _is_datasets(folder: Path) -> bool:
    entries = _visible(folder)
    return bool(entries) and all(entry.is_dir() and not entry.is_symlink() and _is_dataset(entry) for entry in entries)


def _is_models(folder: Path, depth: int = 0) -> bool:
    entries = _visible(folder)
    return bool(entries) and all(_is_models_entry(entry, depth) for entry in entries)


def _is_models_entry(entry: Path, depth: int) -> bool:
    if entry.is_file() and not entry.is_symlink():
        return depth == 0 and entry.suffix == ".json" and _json_with(entry, FOLDS_SUMMARY_KEYS)
    if not entry.is_dir() or entry.is_symlink():
        return False
    if entry.name in NETS:
        return (entry / "config.json").is_file() or (entry / "eval" / "report.json").is_file()
    if entry.name == "ir":
        return all((net.name in NETS or net.name == models.DETECTOR_FOLDER) and net.is_dir() for net in _visible(entry))
    return depth < 2 and _is_models(entry, depth + 1)


def kind(folder: Path) -> Optional[str]:
    """What the kit wrote ``folder`` as ("dataset", "datasets", "demo", "models"), or None."""
    if not folder.is_dir():
        return None
    if _is_dataset(folder):
        return "dataset"
    if _is_datasets(folder):
        return "datasets"
    if (folder / DEMO_MARKER).is_file():
        return "demo"
    return "models" if _is_models(folder) else None


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders to delete")
    args = parser.parse_args(argv)
    found = {}
    for folder in args.folders:
        if not os.path.lexists(folder):
            continue
        found[folder] = kind(folder)
        if found[folder] is None:
            raise KitError(f"{folder}: not a folder the kit wrote (no dataset manifest.json, demo marker "
                           f"{DEMO_MARKER} or models layout); refusing to delete it, nothing deleted")
    for folder, what in found.items():
        if folder.is_symlink():  # as `rm -rf link`: the link goes, not what it points to
            folder.unlink()
        elif folder.exists():  # an earlier folder named may have held this one
            shutil.rmtree(folder)
        print(f"removed {folder} ({what})")


if __name__ == "__main__":
    main()
