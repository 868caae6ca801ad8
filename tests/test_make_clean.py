"""`make clean` deletes the folders the kit wrote, and refuses any other folder with one line, deleting nothing."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataset.build import build
from dataset.demo import write_demo

REPO = Path(__file__).resolve().parents[1]


def make_clean(cwd, **folders):
    # Run from ``cwd`` so that relative folders resolve there, never in the repository.
    # --no-print-directory: under `make test` a nested make would print "make[1]: Entering directory" lines.
    return subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "clean",
                           f"PY={sys.executable}", *(f"{name}={value}" for name, value in folders.items())],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def clean(*folders, cwd=None):
    return subprocess.run([sys.executable, "-m", "caffekit.clean", *map(str, folders)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A real (tiny) dataset folder, as `make dataset` writes it."""
    root = tmp_path_factory.mktemp("clean")
    write_demo(root / "faces", count=30)
    build(root / "faces", root / "built", size=16, progress=False)
    return root / "built"


def copy_of(folder, where):
    shutil.copytree(folder, where)
    return where


@pytest.mark.skipif(not shutil.which("make"), reason="make is not on PATH")
def test_make_clean_refuses_a_folder_with_a_space_it_did_not_write_and_leaves_its_namesakes(tmp_path, dataset):
    for name in ("my", "data", "my data"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "thesis.tex").write_text("mine")
    kit_data = copy_of(dataset, tmp_path / "kit data")
    result = make_clean(tmp_path, DATA_DIR="my data", MODELS_DIR="kit data", DEMO_DIR="no demo")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: my data: not a folder the kit wrote"), result.stderr
    for name in ("my", "data", "my data"):
        assert (tmp_path / name / "thesis.tex").read_text() == "mine"
    assert (kit_data / "manifest.json").is_file()  # nothing is deleted when one folder is refused


@pytest.mark.skipif(not shutil.which("make"), reason="make is not on PATH")
def test_make_clean_deletes_a_dataset_folder_with_a_space_and_skips_missing_ones(tmp_path, dataset):
    copy_of(dataset, tmp_path / "my data")
    (tmp_path / "data").mkdir()
    result = make_clean(tmp_path, DATA_DIR="my data", MODELS_DIR="no models", DEMO_DIR="no demo")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert "removed my data (dataset)" in result.stdout.splitlines()


@pytest.mark.parametrize("case", ["file", "manifest of another tool", "models folder with a stranger"])
def test_clean_refuses_what_only_resembles_a_kit_folder(tmp_path, case):
    target = tmp_path / "target"
    if case == "file":
        target.write_text("not a folder")
    elif case == "manifest of another tool":
        target.mkdir()
        (target / "manifest.json").write_text(json.dumps({"name": "my-app", "version": 2}))
    else:
        (target / "age_net").mkdir(parents=True)
        (target / "age_net" / "config.json").write_text("{}")
        (target / "notes.txt").write_text("mine")
    result = clean(target)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {target}: not a folder the kit wrote (no dataset manifest.json, "
                                          "demo marker .agegender-kit-demo or models layout); refusing to delete "
                                          "it, nothing deleted"]
    assert target.exists()


def test_clean_deletes_a_symlink_to_a_kit_folder_but_not_the_folder(tmp_path, dataset):
    real = copy_of(dataset, tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    result = clean(tmp_path / "link")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "link").exists() and (real / "manifest.json").is_file()


def test_clean_deletes_a_models_folder_laid_out_as_training_and_compiling_leave_it(tmp_path):
    from caffekit import training

    models = tmp_path / "models"
    for out in ("pretrain/age_net", "age_net", "gender_net", "joint_net"):  # training writes config.json first
        training.write_config(training.RunConfig(net=Path(out).name, solver="solver.prototxt", data_dir="data",
                                                 models_dir=str(models), out_dir=str(models / out)))
    for net in ("age_net", "joint_net"):
        (models / "ir" / net / "FP16").mkdir(parents=True)
    result = clean(models)
    assert result.returncode == 0, result.stderr
    assert not models.exists() and result.stdout.splitlines() == [f"removed {models} (models)"]


def test_clean_deletes_the_per_fold_datasets_and_models_that_evaluate_folds_leaves(tmp_path, dataset):
    """`make evaluate-folds` fills DATA_DIR with one dataset per fold (no manifest of its own at the top) and
    MODELS_DIR with one models folder per fold plus the summary JSON; `make clean` takes both, and still refuses a
    folder of datasets with one stranger in it."""
    sys.path.insert(0, str(REPO / "scripts"))
    import evaluate_folds

    data, models = tmp_path / "data", tmp_path / "models"
    for k in range(2):
        copy_of(dataset, data / f"adience_fold_{k}")
        for net, accuracy in (("age", 0.5), ("gender", 0.85)):
            report = models / f"adience_fold_{k}" / f"{net}_net" / "eval" / "report.json"
            report.parent.mkdir(parents=True)
            report.write_text(json.dumps({"protocols": {p: {"accuracy": accuracy, "one_off_accuracy": 0.8}
                                                        for p in ("centre", "10crop")}}))
    summary = models / "adience_folds.json"
    assert evaluate_folds.main([str(models / f"adience_fold_{k}") for k in range(2)] + ["--out", str(summary)]) == 0

    (data / "notes.txt").write_text("mine")
    refused = clean(data, models)
    assert refused.returncode == 2 and data.exists() and models.exists()
    (data / "notes.txt").unlink()
    result = clean(data, models)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"removed {data} (datasets)", f"removed {models} (models)"]
    assert not data.exists() and not models.exists()
