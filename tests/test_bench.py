"""scripts/bench.py end to end in its --quick mode (it checks the bench works, not how fast the CPU is)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import caffe_fixtures as cf

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_writes_a_table_naming_the_cpu(tmp_path, utkface_dir):
    data, models = cf.make_ir_tree(tmp_path)  # both nets: the end-to-end run needs both
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), "--data-dir", data, "--models-dir",
                             models, "--out", out, "--utkface", utkface_dir, "--quick", "--net", "gender"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    rows = {(r["net"], r["precision"], r["engine"].split(" (")[0]) for r in report["rows"]}
    net = "gender_net"
    assert {(net, "FP32 IR, f32", "OpenVINO CPU"), (net, "FP32 IR, bf16", "OpenVINO CPU"),
            (net, "FP16 IR (CPU default)", "OpenVINO CPU"), (net, "FP32", "OpenCV DNN")} <= rows
    assert all(r["latency_ms"] > 0 and r["throughput_ips"] > 0 for r in report["rows"])
    assert any("INT8" in note and "not found" in note for note in report["notes"])
    (e2e,) = report["end_to_end"]
    assert e2e["precision"] == "FP16" and e2e["frames"] == 10 and e2e["fps"] > 0
    table = (out / "results.md").read_text()
    assert report["cpu"] in table and "| gender_net | OpenVINO CPU | FP32 IR, f32 |" in table
