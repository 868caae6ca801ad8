"""Latency and throughput of every engine on both nets, and the end-to-end runner on a video.

    python scripts/bench.py --data-dir data --models-dir models     # writes bench/results.md and .json

On the same images (test-LMDB centre crops when the dataset exists, else generated ones):
median batch-1 latency and async throughput of OpenVINO on the CPU with the FP32 IR at f32
and at bf16 inference precision, the FP16 IR and the INT8 IR; OpenCV DNN on the caffemodel;
the torch model (caffekit.torchnet). Then edge/run_inference.py on a generated 640x480 video
with one UTKFace face moving across it, detection included. All numbers come from one run
on one machine, so their ratios are meaningful; absolute values depend on the CPU named in
the table.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caffekit import atomic, formats, openvino_ir, tasks  # noqa: E402
from caffekit.errors import KitError, cli  # noqa: E402

LATENCY_RUNS = 40       # batch-1 inferences for the median
THROUGHPUT_SECONDS = 10  # per engine: 3 s gave ratios varying by 30% between runs; 10 s keeps the run near 3 minutes
BENCH_IMAGES = 32
VIDEO_FRAMES = 100
SETTINGS = {"latency_runs": LATENCY_RUNS, "seconds": THROUGHPUT_SECONDS}  # --quick lowers them
UTKFACE = REPO.parent / "shared" / "data" / "utkface"


# CPU features that decide which precisions run fast in OpenVINO's CPU plugin.
FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx_vnni": "AVX-VNNI",
            "avx512_bf16": "BF16", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    features = [label for flag, label in FEATURES.items() if flag in cpu_flags()]
    return f"{name} ({os.cpu_count()} logical cores; {', '.join(features) or 'no AVX2'})"


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def versions() -> dict:
    import cv2
    import openvino as ov

    found = {"python": platform.python_version(), "openvino": ov.__version__, "opencv": cv2.__version__}
    try:
        import torch
        found["torch"] = torch.__version__
    except ImportError:
        found["torch"] = None
    return found


# ---------------------------------------------------------------- engines
def time_latency(infer, images) -> float:
    for image in images[:3]:  # warm-up: first calls allocate and compile kernels
        infer(image)
    times = []
    for i in range(SETTINGS["latency_runs"]):
        start = time.perf_counter()
        infer(images[i % len(images)])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def openvino_row(xml, precision_hint, images):
    """(latency ms, throughput img/s, requests) of an IR on the CPU."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    extra = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
    latency_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **extra})
    request = latency_model.create_infer_request()
    latency = time_latency(lambda image: request.infer({0: image[np.newaxis]}), images)

    throughput_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **extra})
    queue = ov.AsyncInferQueue(throughput_model, 0)
    done = [0]
    queue.set_callback(lambda request, userdata: done.__setitem__(0, done[0] + 1))
    for i in range(2 * len(queue)):  # warm-up
        queue.start_async({0: images[i % len(images)][np.newaxis]})
    queue.wait_all()
    done[0] = 0
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < SETTINGS["seconds"]:
        queue.start_async({0: images[i % len(images)][np.newaxis]})
        i += 1
    queue.wait_all()
    return latency, done[0] / (time.perf_counter() - start), len(queue)


def opencv_row(net, mean, images):
    from caffekit.evaluation import OpenCvClassifier

    reference = OpenCvClassifier(net.deploy, net.caffemodel)

    def infer(image):
        return reference.probabilities(image.transpose(2, 0, 1)[np.newaxis].astype(np.float32) - mean)

    latency = time_latency(infer, images)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < SETTINGS["seconds"]:
        infer(images[count % len(images)])
        count += 1
    return latency, count / (time.perf_counter() - start), 1


def torch_row(net, mean, images):
    import torch

    from caffekit import graph, torchnet

    torch.set_num_threads(os.cpu_count() or 1)
    model = torchnet.CaffeNet(formats.read_net(net.deploy), graph.TEST, {net.input_name: net.input_shape},
                              str(net.deploy))
    model.load_weights(net.weights, str(net.caffemodel), require_all=True)
    model.eval()
    blobs = [torch.from_numpy(image.transpose(2, 0, 1)[np.newaxis].astype(np.float32) - mean) for image in images]

    def infer(blob):
        with torch.no_grad():
            return model({net.input_name: blob})[net.output_blob]

    latency = time_latency(infer, blobs)
    batch = torch.cat(blobs[:8])
    infer(batch)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < SETTINGS["seconds"]:
        infer(batch)
        count += len(batch)
    return latency, count / (time.perf_counter() - start), "batch 8"


def bench_net(task, args, images, rows, notes):
    net_name = tasks.TASKS[task]["net"]
    ir = args.models_dir / "ir"
    fp32 = openvino_ir.ir_paths(ir, net_name, "FP32")
    if not fp32["xml"].is_file():
        raise KitError(f"{fp32['xml']}: not found (run `make compile-ncs` first)")
    meta = json.loads(fp32["json"].read_text())
    bf16 = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
    cases = [("OpenVINO CPU", "FP32 IR, f32", fp32["xml"], "f32"),
             ("OpenVINO CPU", "FP32 IR, bf16", fp32["xml"], "bf16" if bf16 else None),
             ("OpenVINO CPU", "FP16 IR (CPU default)", openvino_ir.ir_paths(ir, net_name, "FP16")["xml"], None),
             ("OpenVINO CPU", "INT8 IR", openvino_ir.ir_paths(ir, net_name, "INT8")["xml"], None)]
    if not bf16:
        notes.append("This CPU has no bf16 support: the 'bf16' row ran at the CPU's default precision.")
    for engine, precision, xml, hint in cases:
        if not Path(xml).is_file():
            notes.append(f"{net_name} {precision}: {xml} not found (skipped; `make compile-int8` makes INT8)")
            continue
        print(f"{net_name}: {engine} {precision}", flush=True)
        rows.append(row(net_name, engine, precision, *openvino_row(xml, hint, images)))
    caffemodel = Path(meta["caffe"]["caffemodel"])
    if not caffemodel.is_file():
        notes.append(f"{net_name}: caffemodel {caffemodel} not found: OpenCV and torch rows skipped")
        return
    net = openvino_ir.CaffeNet(REPO / "caffe_models" / net_name / "deploy.prototxt", caffemodel)
    mean = np.load(fp32["mean"])
    print(f"{net_name}: OpenCV DNN", flush=True)
    rows.append(row(net_name, "OpenCV DNN (caffemodel)", "FP32", *opencv_row(net, mean, images)))
    try:
        import torch  # noqa: F401

        from caffekit import torchnet  # noqa: F401
    except ImportError as exc:
        notes.append(f"torch row skipped: {exc}")
        return
    print(f"{net_name}: torch", flush=True)
    rows.append(row(net_name, "torch (caffekit.torchnet)", "FP32", *torch_row(net, mean, images)))


def row(net, engine, precision, latency, throughput, requests):
    return {"net": net, "engine": engine, "precision": precision, "latency_ms": round(latency, 2),
            "throughput_ips": round(throughput, 1), "in_flight": requests}


# ---------------------------------------------------------------- end to end
def face_video(path: Path, utkface: Path, frames: int = VIDEO_FRAMES):
    """A 640x480 video: one UTKFace face (170 px) gliding over a smooth background."""
    import cv2

    chips = sorted(utkface.glob("*.jpg"))
    if not chips:
        raise KitError(f"{utkface}: no UTKFace images for the end-to-end video")
    face = cv2.resize(cv2.imread(str(chips[len(chips) // 2])), (170, 170), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    background = cv2.resize(rng.integers(40, 220, (4, 5, 3), dtype=np.uint8), (640, 480),
                            interpolation=cv2.INTER_CUBIC)
    with atomic.atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp.with_suffix(".avi")), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
        for i in range(frames):
            frame = background.copy()
            x = int(20 + (640 - 210) * (0.5 + 0.5 * np.sin(i / 15)))
            y = int(60 + 120 * (0.5 + 0.5 * np.cos(i / 20)))
            frame[y:y + 170, x:x + 170] = face
            writer.write(frame)
        writer.release()
        os.replace(tmp.with_suffix(".avi"), tmp)


def runner_fps(video: Path, models: Path, precision: str):
    result = subprocess.run([sys.executable, str(REPO / "edge" / "run_inference.py"), "--video", str(video),
                             "--models", str(models), "--precision", precision, "--device", "CPU", "--json"],
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode not in (0, 3):
        raise KitError(f"edge runner failed on {video}: {result.stderr.strip().splitlines()[-1]}")
    match = re.search(r"(\d+) frames in ([\d.]+) s = ([\d.]+) FPS, ([\d.]+) ms CPU per frame", result.stderr)
    faces = sum(len(json.loads(line)["faces"]) == 1 for line in result.stdout.splitlines())
    return {"precision": precision, "frames": int(match.group(1)), "fps": float(match.group(3)),
            "cpu_ms_per_frame": float(match.group(4)), "frames_with_one_face": faces}


def detection_ms(video: Path):
    """The Haar cascade alone on the video's frames: at full 640x480 and at the runner's scale."""
    import cv2

    sys.path.insert(0, str(REPO / "edge"))
    import face_detection

    capture = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < 30:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    out = {}
    full_scale = 640 / face_detection.DETECT_WIDTH  # the same smallest face, in full-size pixels
    for label, detector in (("full 640x480", face_detection.FaceDetector(
                                detect_width=640, min_face=int(face_detection.MIN_FACE * full_scale))),
                            (f"scaled to {face_detection.DETECT_WIDTH} wide",
                             face_detection.FaceDetector())):
        start = time.perf_counter()
        for frame in frames:
            detector.detect(frame)
        out[label] = round(1000 * (time.perf_counter() - start) / len(frames), 2)
    return out


# ---------------------------------------------------------------- report
def markdown(report) -> str:
    lines = [f"# Inference benchmark", "",
             f"CPU: {report['cpu']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + "  ",
             f"Images: {report['images']}  ", f"Date: {report['date']}  ",
             f"Load average (1 min) at start: {report['load_average_at_start']} "
             f"(other work on the machine slows every row alike)", "",
             "| net | engine | precision | latency ms (median, batch 1) | throughput img/s | in flight | vs f32 |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in report["rows"]:
        base = next((b["throughput_ips"] for b in report["rows"]
                     if b["net"] == r["net"] and b["precision"] == "FP32 IR, f32"), None)
        ratio = f"{r['throughput_ips'] / base:.2f}x" if base else ""
        lines.append(f"| {r['net']} | {r['engine']} | {r['precision']} | {r['latency_ms']:.2f} | "
                     f"{r['throughput_ips']:.1f} | {r['in_flight']} | {ratio} |")
    if report.get("end_to_end"):
        lines += ["", "End to end (edge/run_inference.py, CPU, 640x480 video, one face per frame, "
                  "Haar detection + both nets, async):", "",
                  "| precision | frames | FPS | CPU ms per frame (all threads) | frames with the face found |",
                  "|---|---:|---:|---:|---:|"]
        for r in report["end_to_end"]:
            lines.append(f"| {r['precision']} | {r['frames']} | {r['fps']:.1f} | {r['cpu_ms_per_frame']:.1f} | "
                         f"{r['frames_with_one_face']} |")
        lines += ["", f"CPU time per frame depends far less on other load than FPS does; with {os.cpu_count()} "
                  f"cores free, {os.cpu_count()} x 1000 / (CPU ms per frame) is the most frames per second they "
                  f"could sustain."]
        lines += ["", "Haar cascade alone, ms per frame: " +
                  ", ".join(f"{k}: {v}" for k, v in report["detection_ms"].items())]
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
    parser.add_argument("--net", choices=("age", "gender", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (checks the bench, not the CPU)")
    args = parser.parse_args(argv)
    frames = VIDEO_FRAMES
    if args.quick:
        SETTINGS.update(latency_runs=5, seconds=0.3)
        frames = 10

    images, source = openvino_ir.check_images(args.data_dir, "age", 227, count=BENCH_IMAGES)
    report = {"cpu": cpu_name(), "versions": versions(), "images": source,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": [], "notes": [],
              "load_average_at_start": round(os.getloadavg()[0], 2)}
    for task in (("age", "gender") if args.net == "all" else (args.net,)):
        bench_net(task, args, images, report["rows"], report["notes"])
        int8 = openvino_ir.ir_paths(args.models_dir / "ir", tasks.TASKS[task]["net"], "INT8")["json"]
        if int8.is_file():
            q = json.loads(int8.read_text())["int8"]
            report["notes"].append(f"{tasks.TASKS[task]['net']} INT8 test accuracy {100 * q['int8_accuracy']:.1f}% "
                                   f"vs FP32 {100 * q['fp32_accuracy']:.1f}% ({q['test_images']} images)")
    if args.utkface.is_dir() and any(args.utkface.iterdir()):
        video = args.out / "e2e_640x480.avi"
        face_video(video, args.utkface, frames)
        report["end_to_end"] = []
        for precision in ("FP16", "INT8"):
            if openvino_ir.ir_paths(args.models_dir / "ir", "age_net", precision)["xml"].is_file():
                print(f"end to end: {precision}", flush=True)
                report["end_to_end"].append(runner_fps(video, args.models_dir / "ir", precision))
        report["detection_ms"] = detection_ms(video)
        import face_detection  # edge/, put on sys.path by detection_ms

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
