"""`make demo` end to end on the generated smoke set, with a 2-iteration schedule to stay fast."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--iterations", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for net in ("age_net", "gender_net"):
        assert (out / "models" / net / f"{net}_iter_2.caffemodel").is_file()
        report = json.loads((out / "models" / net / "eval" / "report.json").read_text())
        assert report  # the evaluation ran through OpenCV and wrote its numbers
        for precision in ("FP16", "FP32"):
            assert (out / "models" / "ir" / net / precision / f"{net}.xml").is_file()
    annotated = cv2.imread(str(out / "annotated.png"))
    assert annotated is not None and annotated.shape[0] >= 200
    assert "age " in result.stdout and "demo finished" in result.stdout
