"""Latency and throughput of the edge runner's engines on every net, and the runner itself on a video.

    python scripts/bench.py --data-dir data --models-dir models     # writes bench/results.md and .json

Every row times an engine of edge/engines.py as edge/run_inference.py builds it: OpenVINO on
the CPU with the FP32 IR (f32 forced, and at the CPU's default precision: bf16 where the CPU has
it), the FP16 and INT8 IRs; OpenCV DNN on the caffemodel. Latency: median of batch-1 engine.infer
calls (engine compiled for latency); throughput: median over timed windows of results per second
through engine.infer_async, the engine's own request queue (engine compiled for throughput). Then
edge/run_inference.py on a generated 640x480 video with one UTKFace face moving across it. "Both tasks, one
face" rows add up what a face costs: the pair's two latencies, or the joint net's one.
All numbers come from one run on the CPU named in the table, so their ratios are meaningful.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# edge/ is a folder of scripts copied to the device as is, whose modules import each other by bare
# name, so it goes on the path itself (not imported as a package).
sys.path[:0] = [str(REPO), str(REPO / "edge")]

import engines  # noqa: E402
import blazeface  # noqa: E402
import face_detection  # noqa: E402
from model_files import EdgeError, model_files  # noqa: E402

from caffekit import atomic, hardware, models, openvino_ir  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402

BENCH_IMAGES = 32  # test-LMDB centre crops when the dataset exists, else generated ones
# One 3 s throughput window gave ratios varying by 30% between runs. Five 2 s windows cost the same 10 s as the
# single window that replaced it, and their median is not moved by one window that other work disturbed.
FULL = {"latency_runs": 40, "windows": 5, "window_s": 2.0, "frames": 100}
QUICK = {"latency_runs": 5, "windows": 3, "window_s": 0.1, "frames": 10}
UTKFACE = REPO.parent / "shared" / "data" / "utkface"
# (IR, force f32): f32 is the reference the other rows are compared with; the rest run as the runner runs them.
OPENVINO_CASES = (("FP32", True), ("FP32", False), ("FP16", False), ("INT8", False))

def cpu_name() -> str:
    return f"{hardware.read_cpu().summary()}, {os.cpu_count()} logical cores"


# ---------------------------------------------------------------- engines
def latency_ms(engine, images, settings) -> float:
    for image in images[:3]:  # the first calls allocate and pick kernels
        engine.infer(image)
    times = []
    for i in range(settings["latency_runs"]):
        start = time.perf_counter()
        engine.infer(images[i % len(images)])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def throughput_ips(engine, images, settings):
    """(median, every window) of results per second through the engine's own async requests; results timed."""
    done = []
    engine.set_callback(lambda userdata, probs: done.append(userdata))
    engine.infer_async(images[0], -1)  # creates the engine's queue, so requests_in_flight is known
    for i in range(2 * engine.requests_in_flight):
        engine.infer_async(images[i % len(images)], -1)
    engine.wait_all()
    windows, timed = [], 0
    for _ in range(settings["windows"]):
        del done[:]
        start, i = time.perf_counter(), 0
        while time.perf_counter() - start < settings["window_s"]:
            engine.infer_async(images[i % len(images)], i)
            i += 1
        engine.wait_all()
        windows.append(len(done) / (time.perf_counter() - start))
        timed += len(done)
    return float(np.median(windows)), [round(w, 1) for w in windows], timed


def openvino_engine(files, mode, force_f32):
    if not force_f32:
        return engines.make_engine(files, "CPU", "openvino", mode)
    # make_engine takes no compile options; a Core whose CPU property is set leaves the rest of the
    # engine's code (hints, fallbacks, queue, output copy) as the runner runs it.
    Core, AsyncInferQueue, version = engines.import_openvino()

    def core_forcing_f32():
        core = Core()
        core.set_property("CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return core

    return engines.OpenVINOEngine(files, "CPU", mode, (core_forcing_f32, AsyncInferQueue, version))


def inference_precision(engine) -> str:
    """What the compiled model runs at ('f32', 'bf16'), as OpenVINO reports it."""
    return engine.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def bench_net(key, ir, data_dir, settings, rows, notes):
    entry = models.model(key)
    net = entry.name
    images = None
    for precision, force_f32 in OPENVINO_CASES:
        try:
            files = model_files(str(ir), net, precision)
        except EdgeError as exc:
            if precision != "INT8":
                raise
            notes.append(f"{net} INT8 row skipped: {exc}")
            continue
        if images is None:
            images, source = openvino_ir.check_images(data_dir, entry.data, files.meta["input"]["shape"][1],
                                                      count=BENCH_IMAGES)
            notes.append(f"{net} images: {source}")
        latency_engine, engine = (openvino_engine(files, mode, force_f32) for mode in ("latency", "throughput"))
        runs_at = inference_precision(engine)
        how = "forced" if force_f32 else "CPU default"
        label = f"INT8 IR, INT8 + {runs_at} ({how})" if precision == "INT8" else f"{precision} IR, {runs_at} ({how})"
        print(f"{net}: {engine.name}, {label}", flush=True)
        rows.append(row(net, engine, label, precision, runs_at, force_f32, latency_engine, images, settings))
        if "int8" in files.meta:
            q = files.meta["int8"]
            notes.append(f"{net} INT8 test accuracy {100 * q['int8_accuracy']:.1f}% vs FP32 "
                         f"{100 * q['fp32_accuracy']:.1f}% ({q['test_images']} images)")
    try:
        engine = engines.make_engine(model_files(str(ir), net, "FP32"), None, "opencv")
    except EdgeError as exc:
        notes.append(f"{net} OpenCV row skipped: {exc}")
        return
    print(f"{net}: {engine.name}", flush=True)
    rows.append(row(net, engine, "FP32", "caffemodel", "f32", False, engine, images, settings))


def both_tasks_rows(rows):
    """Per face, both tasks: the pair's two latencies added (two requests), the joint net's own (one)."""
    out = []
    for label in dict.fromkeys(r["precision"] for r in rows):
        by_net = {r["net"]: r for r in rows if r["precision"] == label}
        pair = [by_net.get(models.model(key).name) for key in models.PAIR]
        if all(pair):
            out.append({"models": "pair (age_net + gender_net)", "precision": label, "requests": 2,
                        "latency_ms": round(sum(r["latency_ms"] for r in pair), 2)})
        joint = by_net.get(models.model("joint").name)
        if joint:
            out.append({"models": "joint_net", "precision": label, "requests": 1, "latency_ms": joint["latency_ms"]})
    return out


def row(net, engine, label, model, runs_at, forced, latency_engine, images, settings):
    latency = latency_ms(latency_engine, images, settings)
    throughput, windows, timed = throughput_ips(engine, images, settings)
    return {"net": net, "engine": engine.name, "precision": label, "model": model, "inference_precision": runs_at,
            "forced_f32": forced, "latency_ms": round(latency, 2), "throughput_ips": round(throughput, 1),
            "throughput_windows_ips": windows, "timed_results": timed, "in_flight": engine.requests_in_flight}


# ---------------------------------------------------------------- end to end
def face_video(path: Path, utkface: Path, frames: int, faces: int = 1):
    """A 640x480 video: one UTKFace face (170 px) gliding over a smooth background, or ``faces`` = 4
    faces (130 px), one gliding in each quarter of the frame."""
    chips = sorted(utkface.glob("*.jpg"))
    if not chips:
        raise KitError(f"{utkface}: no UTKFace images for the end-to-end video")
    side = 170 if faces == 1 else 130
    picked = [cv2.resize(cv2.imread(str(chips[len(chips) * (2 * k + 1) // (2 * faces)])), (side, side),
                         interpolation=cv2.INTER_AREA) for k in range(faces)]
    rng = np.random.default_rng(0)
    background = cv2.resize(rng.integers(40, 220, (4, 5, 3), dtype=np.uint8), (640, 480),
                            interpolation=cv2.INTER_CUBIC)
    areas = [(0, 0, 640, 480)] if faces == 1 else [(x, y, 320, 240) for y in (0, 240) for x in (0, 320)]
    with atomic.atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp.with_suffix(".avi")), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
        for i in range(frames):
            frame = background.copy()
            for k, (face, (ax, ay, aw, ah)) in enumerate(zip(picked, areas)):
                x = int(ax + 10 + (aw - side - 20) * (0.5 + 0.5 * np.sin(i / 15 + k)))
                y = int(ay + 10 + (ah - side - 20) * (0.5 + 0.5 * np.cos(i / 20 + k)))
                frame[y:y + side, x:x + side] = face
            writer.write(frame)
        writer.release()
        os.replace(tmp.with_suffix(".avi"), tmp)


def runner_fps(video: Path, ir: Path, precision: str, model: str, detector: str = "haar", faces: int = 1):
    result = subprocess.run([sys.executable, str(REPO / "edge" / "run_inference.py"), "--video", str(video),
                             "--models", str(ir), "--precision", precision, "--device", "CPU", "--json",
                             "--model", model, "--detector", detector], capture_output=True, text=True, cwd=REPO)
    if result.returncode not in (0, 3):
        raise KitError(f"edge runner failed on {video}: {result.stderr.strip().splitlines()[-1]}")
    match = re.search(r"(\d+) frames in ([\d.]+) s = ([\d.]+) FPS, ([\d.]+) ms CPU per frame", result.stderr)
    found = sum(len(json.loads(line)["faces"]) == faces for line in result.stdout.splitlines())
    return {"model": model, "precision": precision, "detector": detector, "faces": faces,
            "frames": int(match.group(1)), "fps": float(match.group(3)),
            "cpu_ms_per_frame": float(match.group(4)), "frames_with_all_faces": found}


def detection_ms(video: Path, ir: Path, openvino):
    """Each detector alone on the video's frames, median ms per frame, with the cost of cutting (or
    warping) one chip: the Haar cascade at full 640x480 and at the runner's scale, BlazeFace (when
    built) through OpenVINO and through OpenCV, aligned as the runner aligns (after the second look at each face)
    and, for its cost, without it."""
    capture = cv2.VideoCapture(str(video))
    frames = [frame for frame in (capture.read()[1] for _ in range(30)) if frame is not None]
    full_scale = 640 / face_detection.DETECT_WIDTH  # the same smallest face, in full-size pixels
    detectors = [("Haar, full 640x480", face_detection.HaarDetector(
                    detect_width=640, min_face=int(face_detection.MIN_FACE * full_scale))),
                 (f"Haar, scaled to {face_detection.DETECT_WIDTH} wide", face_detection.HaarDetector())]
    meta = blazeface.read_detector_json(str(ir))
    if meta is not None:
        detectors += [("BlazeFace short range, OpenVINO IR, aligned", face_detection.load_detector(
                          str(ir), "blazeface", "short", True, openvino)),
                      ("BlazeFace short range, OpenVINO IR, aligned without the second look",
                       face_detection.load_detector(str(ir), "blazeface", "short", True, openvino, refine=False)),
                      ("BlazeFace short range, OpenCV tflite, aligned", face_detection.load_detector(
                          str(ir), "blazeface", "short", True, None))]
        if "full_range" in meta["models"]:
            detectors.append(("BlazeFace full range, OpenVINO IR, aligned", face_detection.load_detector(
                str(ir), "blazeface", "full", False, openvino)))
    out = {}
    for label, detector in detectors:
        for frame in frames[:3]:
            detector.detect(frame)
        times = []
        for frame in frames:
            start = time.perf_counter()
            for detection in detector.detect(frame)[:1]:
                face_detection.face_chip(frame, detection, 72, detector.framing)
            times.append(time.perf_counter() - start)
        out[label] = round(1000 * float(np.median(times)), 2)
    return out

# ---------------------------------------------------------------- report
def markdown(report) -> str:
    lines = ["# Inference benchmark", "",
             f"CPU: {report['cpu']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  ",
             f"Images: {report['images']}  ", f"Date: {report['date']}  ",
             f"Load average (1 min) at start: {report['load_average_at_start']} "
             f"(other work on the machine slows every row alike)", "",
             "| net | engine (edge/engines.py) | precision | latency ms (median, batch 1) | "
             "throughput img/s (median) | in flight | vs f32 |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in report["rows"]:
        base = next((b["throughput_ips"] for b in report["rows"] if b["net"] == r["net"] and b["forced_f32"]), None)
        ratio = f"{r['throughput_ips'] / base:.2f}x" if base else ""
        lines.append(f"| {r['net']} | {r['engine']} | {r['precision']} | {r['latency_ms']:.2f} | "
                     f"{r['throughput_ips']:.1f} | {r['in_flight']} | {ratio} |")
    if report.get("both_tasks"):
        lines += ["", "Both tasks, one face (batch-1 latency of the requests a face needs):", "",
                  "| models | precision | requests per face | latency ms |", "|---|---|---:|---:|"]
        lines += [f"| {r['models']} | {r['precision']} | {r['requests']} | {r['latency_ms']:.2f} |"
                  for r in report["both_tasks"]]
    if report.get("end_to_end"):
        lines += ["", "End to end (edge/run_inference.py, CPU, 640x480 video, detection + both tasks, async; "
                  "BlazeFace: short range, aligned, as the runner picks it for video):", "",
                  "| models | precision | detector | faces per frame | frames | FPS | CPU ms per frame (all threads) "
                  "| frames with every face found |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in report["end_to_end"]:
            lines.append(f"| {r['model']} | {r['precision']} | {r['detector']} | {r['faces']} | {r['frames']} | "
                         f"{r['fps']:.1f} | {r['cpu_ms_per_frame']:.1f} | {r['frames_with_all_faces']} |")
        lines += ["", f"CPU time per frame depends far less on other load than FPS does; with {os.cpu_count()} "
                  f"cores free, {os.cpu_count()} x 1000 / (CPU ms per frame) is the most frames per second they "
                  f"could sustain.", "", "Detectors alone (median ms per 640x480 frame, cutting or warping one "
                  "chip where a face is found):", "", "| detector | ms |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in report["detection_ms"].items()]
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--utkface", type=Path, default=UTKFACE, help="faces for the end-to-end video")
    parser.add_argument("--out", type=Path, default=REPO / "bench", help="folder for results.md/.json")
    parser.add_argument("--net", choices=tuple(models.MODELS) + ("all",), default="all",
                        help="all: the pair and, once compiled, the joint net")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (checks the bench, not the CPU)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    openvino = engines.import_openvino()
    if openvino is None:
        raise KitError("OpenVINO is not installed (`make setup` installs it)")

    ir = args.models_dir / "ir"
    keys = [args.net] if args.net != "all" else list(models.PAIR) + [
        key for key in models.MODELS if key not in models.PAIR and (ir / models.model(key).name / "FP32").is_dir()]
    report = {"cpu": cpu_name(), "images": "test-LMDB centre crops of each net's own size (see notes)",
              "settings": settings,
              "versions": {"python": platform.python_version(), "openvino": openvino[2], "opencv": cv2.__version__},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": [],
              "notes": ["'forced': the FP32 IR compiled with INFERENCE_PRECISION_HINT=f32; 'CPU default': "
                        "no hint, as the runner compiles it (OpenVINO picks bf16 on CPUs with AVX-512 BF16 or AMX)."],
              "load_average_at_start": round(os.getloadavg()[0], 2)}
    try:
        for key in keys:
            bench_net(key, ir, args.data_dir, settings, report["rows"], report["notes"])
    except EdgeError as exc:  # a missing or mismatched FP16/FP32 IR
        raise KitError(str(exc))
    report["both_tasks"] = both_tasks_rows(report["rows"])
    if args.utkface.is_dir() and any(args.utkface.iterdir()):
        videos = {}
        for faces in (1, 4):
            videos[faces] = args.out / f"e2e_640x480_{faces}face{'s' if faces > 1 else ''}.avi"
            face_video(videos[faces], args.utkface, settings["frames"], faces)
        report["end_to_end"] = []
        detectors = ["haar"] + (["blazeface"] if blazeface.read_detector_json(str(ir)) is not None else [])
        for model, net in (("pair", "age_net"), ("joint", "joint_net")):
            for precision in ("FP16", "INT8"):
                if not openvino_ir.ir_paths(ir, net, precision)["xml"].is_file():
                    continue
                for detector in detectors:
                    for faces in (1, 4) if precision == "FP16" else (1,):
                        print(f"end to end: {model} {precision} {detector} {faces} face(s)", flush=True)
                        report["end_to_end"].append(runner_fps(videos[faces], ir, precision, model, detector, faces))
        report["detection_ms"] = detection_ms(videos[1], ir, openvino)
        report["notes"].append(f"The runner detects faces on a copy scaled to {face_detection.DETECT_WIDTH} "
                               f"pixels wide (smallest face {face_detection.MIN_FACE} px there, pyramid step "
                               f"{face_detection.SCALE_STEP}): the Haar cascade on the full 640x480 frame costs "
                               f"more, as the detection line shows.")
    else:
        report["notes"].append(f"end-to-end run skipped: no UTKFace images at {args.utkface}")
    report["load_average_at_end"] = round(os.getloadavg()[0], 2)
    atomic.write_text(args.out / "results.json", json.dumps(report, indent=2) + "\n")
    atomic.write_text(args.out / "results.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
