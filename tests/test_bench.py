"""scripts/bench.py in its --quick mode: it checks the bench measures the runner's engines, not how fast the CPU is."""
import collections
import importlib.util
import json
from pathlib import Path

import pytest

import caffe_fixtures as cf

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def spy_on_engines(monkeypatch, engines):
    """Every engine edge/engines.py builds, with how many infer and infer_async calls it received."""
    made = []

    def counting(cls, method):
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            self.calls[method] += 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, method, wrapper)

    def recording(cls):
        original = cls.__init__

        def init(self, *args, **kwargs):
            self.calls = collections.Counter()
            original(self, *args, **kwargs)
            made.append(self)
        monkeypatch.setattr(cls, "__init__", init)

    for cls in (engines.OpenVINOEngine, engines.OpenCVEngine):
        recording(cls)
        counting(cls, "infer")
    counting(engines.Engine, "infer_async")  # the OpenCV engine's
    counting(engines.OpenVINOEngine, "infer_async")
    return made


@pytest.mark.slow
def test_bench_rows_time_the_runners_engines(tmp_path, utkface_dir, monkeypatch):
    bench = load_bench()
    import openvino as ov

    made = spy_on_engines(monkeypatch, bench.engines)
    data, models = cf.make_ir_tree(tmp_path)  # both nets: the end-to-end run needs both
    out = tmp_path / "bench"
    bench.main(["--data-dir", str(data), "--models-dir", str(models), "--out", str(out), "--utkface", str(utkface_dir),
                "--quick", "--net", "gender"])

    report = json.loads((out / "results.json").read_text())
    cpu_default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    assert [(r["model"], r["inference_precision"], r["forced_f32"]) for r in report["rows"]] == [
        ("FP32", "f32", True), ("FP32", cpu_default, False), ("FP16", cpu_default, False), ("caffemodel", "f32", False)]
    # Each IR row compiles a latency engine, then a throughput one, in row order (on a CPU without bf16 the forced
    # and the default FP32 rows both run at f32, so the precision alone does not tell their engines apart).
    openvino_made = iter([e for e in made if isinstance(e, bench.engines.OpenVINOEngine)])
    for r in report["rows"]:
        assert r["net"] == "gender_net" and r["latency_ms"] > 0 and r["throughput_ips"] > 0, r
        assert r["throughput_ips"] == pytest.approx(sorted(r["throughput_windows_ips"])[1], abs=0.1)  # the median
        same = [e for e in made if e.name == r["engine"]]
        # Every timed result went through the engine's infer_async, after one call that sets up its
        # queue and a warm-up of two per request in flight; latency is 3 warm-up + the timed infer calls.
        async_calls = 1 + 2 * r["in_flight"] + r["timed_results"]
        infer_calls = 3 + bench.QUICK["latency_runs"]
        if r["model"] == "caffemodel":
            (engine,) = same
            assert isinstance(engine, bench.engines.OpenCVEngine) and engine.calls["infer_async"] == async_calls
            assert engine.calls["infer"] == infer_calls + async_calls  # the OpenCV engine's infer_async runs infer
            continue
        own = [next(openvino_made), next(openvino_made)]
        assert all(e.name == r["engine"] and bench.inference_precision(e) == r["inference_precision"] for e in own)
        hints = {str(e.compiled.get_property("PERFORMANCE_HINT")): e for e in own}
        assert sorted(hints) == ["LATENCY", "THROUGHPUT"], r
        # Latency from engine.infer on the latency-compiled engine; throughput through the
        # throughput-compiled engine's own queue, whose size the row reports.
        assert hints["LATENCY"].calls["infer"] == infer_calls and not hints["LATENCY"].calls["infer_async"]
        assert hints["THROUGHPUT"].calls["infer_async"] == async_calls and not hints["THROUGHPUT"].calls["infer"]
        assert r["in_flight"] == hints["THROUGHPUT"].requests_in_flight > 1
        assert r["precision"].startswith(f"{r['model']} IR, {r['inference_precision']} (")
    assert any("INT8" in note and "missing" in note for note in report["notes"])
    # No detector built in this models folder: the Haar cascade, on the one-face and the four-face video.
    assert [(e["detector"], e["faces"]) for e in report["end_to_end"]] == [("haar", 1), ("haar", 4)]
    for e2e in report["end_to_end"]:
        assert e2e["precision"] == "FP16" and e2e["frames"] == 10 and e2e["fps"] > 0
    table = (out / "results.md").read_text()
    assert report["cpu"] in table and f"| gender_net | {report['rows'][0]['engine']} | FP32 IR, f32 (forced) |" in table
