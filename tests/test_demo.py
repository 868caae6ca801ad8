"""`make demo` end to end on the generated smoke set, with a 2-iteration schedule to stay fast."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_demo(out, *extra):
    return subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, "--iterations", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for net in ("age_net", "gender_net", "joint_net"):
        assert (out / "models" / net / f"{net}_iter_2.caffemodel").is_file()
        report = json.loads((out / "models" / net / "eval" / "report.json").read_text())
        # The evaluation ran through OpenCV on the newest snapshot (the prior-corrected copy, written last)
        # and scored every test record of the build.
        assert Path(report["weights"]) == out / "models" / net / f"{net}_prior_iter_2.caffemodel"
        test_records = len((out / "data" / f"{net[:-4]}_test.csv").read_text().splitlines()) - 1
        for protocol in ("centre", "10crop"):
            heads = report["protocols"][protocol]
            for scores in ([heads["age"], heads["gender"]] if net == "joint_net" else [heads]):
                confusion = np.array(scores["confusion_matrix"])
                assert scores["count"] == confusion.sum() == test_records > 0
                assert scores["correct"] == np.trace(confusion)
        for precision in ("FP16", "FP32"):
            assert (out / "models" / "ir" / net / precision / f"{net}.xml").is_file()
    for name in ("annotated.png", "annotated_pair.png", "annotated_group.png"):
        annotated = cv2.imread(str(out / name))
        assert annotated is not None and annotated.shape[0] >= 200
    # A line for face 1 from each runner: the joint net's, the pair's (--no-detect), then the group photo's,
    # where BlazeFace finds all six faces and --save-crops writes what the nets saw of each.
    faces = [line for line in result.stdout.splitlines() if ": face 1 at " in line and " years, " in line]
    assert len(faces) == 3, result.stdout[-2000:]
    assert len(list((out / "crops").glob("insightface_t1_*.png"))) == 6
    assert "demo finished" in result.stdout

    cleaned = subprocess.run([sys.executable, "-m", "caffekit.clean", str(out)], capture_output=True, text=True)
    assert cleaned.returncode == 0 and cleaned.stdout == f"removed {out} (demo)\n" and not out.exists()


def test_demo_refuses_an_out_folder_holding_other_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    result = run_demo(tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path}: exists and is not a demo folder (it holds "
                                          "thesis.tex); give another --out"]
    assert [path.name for path in tmp_path.iterdir()] == ["thesis.tex"]
