"""Every make target passes paths that hold spaces (and quotes) to the tools as single arguments."""
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not shutil.which("make"), reason="make is not on PATH")

PY = "/opt/my python/bin/python"
VARIABLES = {"PY": PY, "VENV": "my venv", "UTKFACE_DIR": "my faces", "DATA_DIR": "it's data", "MODELS_DIR": "my models",
             "DEMO_DIR": "my demo", "SOLVER": "my solver.prototxt", "RESUME": "my run_iter_2.solverstate",
             "WEIGHTS": "my weights.caffemodel", "IMAGE": "my photo.jpg"}
# The arguments each target's commands must carry whole.
EXPECTED = {
    "setup": ["my venv", "my venv/bin/python"],
    "demo": [PY, "my demo", "my faces"],
    "download": [PY, "my faces"],
    "dataset": [PY, "my faces", "it's data", "it's data/pretrain", "it's data/splits/test.txt"],
    "dataset-val": [PY, "it's data/val", "it's data/val/pretrain", "it's data/splits/test.txt",
                    "it's data/val/splits/test.txt"],
    "train-age": [PY, "it's data", "my models", "my solver.prototxt", "my run_iter_2.solverstate"],
    "train-gender": [PY, "it's data", "my models", "my solver.prototxt"],
    "train-joint": [PY, "it's data", "my models", "my solver.prototxt"],
    "test-joint": [PY, "it's data", "my models", "my weights.caffemodel"],
    "evaluate": [PY, "it's data", "my models", "my weights.caffemodel"],
    "evaluate-folds": [PY, "my faces", "it's data/adience_fold_0", "my models/adience_fold_0",
                       "it's data/adience_fold_4", "my models/adience_fold_4", "my models/adience_folds.json"],
    "compile-ncs": [PY, "it's data", "my models", "my weights.caffemodel"],
    "compile-int8": [PY, "it's data", "my models", "my weights.caffemodel"],
    "run": [PY, "my models/ir", "my photo.jpg"],
    "bench": [PY, "it's data", "my models", "my faces"],
    "bench-robustness": [PY, "it's data", "my models", "my faces"],
    "detector": [PY, "my models"],
    "bench-dataset": [PY, "my faces"],
    "bench-train": [PY],
    "test": [PY],
    "test-oracle": [PY],
    "clean": [PY, "it's data", "my models", "my demo"],
}


def make(*args, cwd=REPO):
    # --no-print-directory: under `make test` a nested make would print "make[1]: Entering directory" lines.
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("target", sorted(EXPECTED))
def test_target_passes_paths_with_spaces_and_quotes_as_single_words(target):
    result = make("-n", target, *(f"{name}={value}" for name, value in VARIABLES.items()))
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)  # as the shell splits the recipe
    missing = [value for value in EXPECTED[target] if value not in words]
    assert not missing, result.stdout


@pytest.mark.parametrize("target", ["train-age", "train-gender", "train-joint"])
def test_train_targets_leave_the_stages_to_train_py_unless_asked(target):
    """By default `make train-*` is `scripts/train.py --net *` on the folders: the script finds the pre-training
    set itself. PRETRAIN=0, PRETRAIN_DIR= and INIT_WEIGHTS= each become the script's own option."""
    words = shlex.split(make("-n", target).stdout)
    assert words[words.index("--net") + 2:] == ["--backend", "auto", "--data-dir", "data", "--models-dir", "models"]
    assert "--no-pretrain" in shlex.split(make("-n", target, "PRETRAIN=0").stdout)
    words = shlex.split(make("-n", target, "PRETRAIN_DIR=my pre-training set").stdout)
    assert words[words.index("--pretrain-data") + 1] == "my pre-training set"
    words = shlex.split(make("-n", target, "INIT_WEIGHTS=my weights.caffemodel").stdout)
    assert words[words.index("--weights") + 1] == "my weights.caffemodel" and "--pretrain-data" not in words


@pytest.mark.slow
def test_dataset_train_compile_run_and_clean_under_paths_with_spaces(tmp_path):
    """The stages as a user types them, on a tiny generated set, every folder under a path with spaces."""
    from dataset.demo import write_demo

    root = tmp_path / "kit's work folder"
    faces, data, models = root / "utk faces", root / "the data", root / "the models"
    write_demo(faces, count=30)
    paths = [f"UTKFACE_DIR={faces}", f"DATA_DIR={data}", f"MODELS_DIR={models}", f"PY={sys.executable}"]

    def step(*args):
        result = make(*args, *paths)
        assert result.returncode == 0, f"make {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    step("dataset", "PRETRAIN=0")
    assert (data / "manifest.json").is_file() and (data / "lmdb" / "age_train_lmdb" / "data.mdb").is_file()
    for net in ("age", "gender"):
        # One iteration, one test batch: the net and the data are the real ones, the schedule is short.
        solver = root / "solvers" / f"{net} solver.prototxt"
        solver.parent.mkdir(exist_ok=True)
        solver.write_text(f'net: "caffe_models/{net}_net/train_val.prototxt"\ntest_iter: 1\ntest_interval: 100\n'
                          f'base_lr: 0.001\nlr_policy: "fixed"\nmax_iter: 1\nmomentum: 0.9\n'
                          f'snapshot_prefix: "{net}_net"\nsolver_mode: CPU\n')
        step(f"train-{net}", "PRETRAIN=0", "BACKEND=torch", f"SOLVER={solver}")
        assert (models / f"{net}_net" / f"{net}_net_iter_1.caffemodel").is_file()
    step("compile-ncs")
    for net in ("age_net", "gender_net"):
        assert (models / "ir" / net / "FP16" / f"{net}.xml").is_file()
    image = root / "a photo" / "face 1.jpg"
    image.parent.mkdir()
    shutil.copyfile(sorted(faces.iterdir())[0], image)
    run = step("run", f"IMAGE={image}", "DEVICE=CPU")
    assert f"{image}: face 1 at " in run.stdout

    cleaned = step("clean", f"DEMO_DIR={root / 'no demo'}")
    assert sorted(path.name for path in root.iterdir()) == ["a photo", "solvers", "utk faces"]
    assert f"removed {data} (dataset)" in cleaned.stdout and f"removed {models} (models)" in cleaned.stdout


def test_nproc_runs_training_under_torchrun_with_that_many_workers():
    words = shlex.split(make("-n", "train-gender", "NPROC=2").stdout)
    assert words[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert words[5:8] == ["scripts/train.py", "--net", "gender"]
    assert "torch.distributed.run" not in make("-n", "train-gender").stdout  # one process by default
