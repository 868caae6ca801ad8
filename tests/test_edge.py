"""edge/run_inference.py as a user runs it (a subprocess), on real UTKFace faces and random-weight IRs."""
import ast
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe_fixtures as cf

REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / "edge"
RUNNER = [sys.executable, str(EDGE / "run_inference.py")]
sys.path.insert(0, str(EDGE))

import face_detection  # noqa: E402  (edge/ modules import each other flat, as on the device)
import run_inference  # noqa: E402

PLACES = [(30, 60), (240, 200), (450, 40)]  # where the faces go on a 640x480 background
FACE_SIDE = 150


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/ir with FP16 and FP32 IRs of both nets (random weights), as compile_ir.py lays it out."""
    root = tmp_path_factory.mktemp("edge")
    data, models = cf.make_ir_tree(root)
    return models / "ir"


def face_chips(utkface_dir, count, seed=1):
    files = sorted(utkface_dir.glob("*.jpg"))
    random.Random(seed).shuffle(files)
    return [cv2.imread(str(f)) for f in files[:count]], files[:count]


@pytest.fixture(scope="module")
def scene(utkface_dir, tmp_path_factory):
    """Three UTKFace faces pasted onto a 640x480 background at known places."""
    chips, _ = face_chips(utkface_dir, len(PLACES))
    canvas = cf.background(seed=0)
    boxes = cf.paste_faces(canvas, chips, PLACES, FACE_SIDE)
    path = tmp_path_factory.mktemp("scene") / "three faces.png"
    cv2.imwrite(str(path), canvas)
    return path, boxes


def run(*args, cwd=REPO):
    return subprocess.run([*RUNNER, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_finds_every_face_and_prints_json(models, scene, tmp_path):
    path, boxes = scene
    out = tmp_path / "annotated.png"
    result = run("--models", models, "--device", "CPU", "--image", path, "--json", "--output", out)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["image"] == str(path) and record["ms"] > 0
    assert len(record["faces"]) == len(boxes)
    for box in boxes:  # each pasted face found where it was put
        assert max(cf.iou(box, face["box"]) for face in record["faces"]) > 0.6
    ages = json.loads((models / "age_net/FP16/age_net.json").read_text())["labels"]
    for face in record["faces"]:
        assert face["age"] in ages and face["gender"] in ("Male", "Female")
        assert 1 / 9 <= face["age_prob"] <= 1 and 0.5 <= face["gender_prob"] <= 1
    annotated = cv2.imread(str(out))
    assert annotated.shape == (480, 640, 3) and np.any(annotated != cv2.imread(str(path)))


def test_text_output_one_line_per_face(models, scene):
    path, boxes = scene
    result = run("--models", models, "--device", "CPU", "--image", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(boxes) and all(" age " in line and "%" in line for line in lines)


def test_no_detect_on_a_utkface_chip_matches_the_opencv_engine(models, utkface_dir, tmp_path):
    _, (chip,) = face_chips(utkface_dir, 1, seed=5)
    records = []
    for engine in ("openvino", "opencv"):
        result = run("--models", models, "--precision", "FP32", "--engine", engine, "--image", chip,
                     "--no-detect", "--json")
        assert result.returncode == 0, result.stderr
        records.append(json.loads(result.stdout)["faces"])
    (ov_face,), (cv_face,) = records
    assert ov_face["box"] == [0, 0, 200, 200]
    assert (ov_face["age"], ov_face["gender"]) == (cv_face["age"], cv_face["gender"])
    assert abs(ov_face["age_prob"] - cv_face["age_prob"]) < 1e-3


def test_without_openvino_the_opencv_engine_takes_over(models, utkface_dir):
    """A device with only numpy and OpenCV: importing openvino fails, the runner uses the caffemodel."""
    _, (chip,) = face_chips(utkface_dir, 1, seed=5)
    args = ["--models", str(models), "--precision", "FP32", "--image", str(chip), "--no-detect", "--json"]
    code = ("import runpy, sys; sys.modules['openvino'] = None; sys.path.insert(0, {!r}); "
            "sys.argv = ['run_inference.py'] + {!r}; runpy.run_path({!r}, run_name='__main__')"
            .format(str(EDGE), args, str(EDGE / "run_inference.py")))
    fallback = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert fallback.returncode == 0, fallback.stderr
    explicit = run(*args, "--engine", "opencv")
    assert json.loads(fallback.stdout)["faces"] == json.loads(explicit.stdout)["faces"]
    refused = subprocess.run([sys.executable, "-c", code.replace("'--json']", "'--json', '--device', 'MYRIAD']")],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "OpenVINO is not installed" in refused.stderr


def test_folder_keeps_requests_in_flight_and_writes_annotations(models, utkface_dir, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    _, files = face_chips(utkface_dir, 6, seed=2)
    for f in files:
        shutil.copy(f, folder / f.name)
    result = run("--models", models, "--device", "CPU", "--dir", folder, "--no-detect", "--json",
                 "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(folder / f.name) for f in sorted(files)]  # input order kept
    assert len(list((tmp_path / "out").glob("*.png"))) == 6


def test_video_with_faces_reports_fps_and_writes_video(models, utkface_dir, tmp_path):
    chips, _ = face_chips(utkface_dir, 1, seed=1)
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
    for i in range(12):
        canvas = cf.background(seed=0)
        cf.paste_faces(canvas, chips, [(40 + 20 * i, 120)], FACE_SIDE)
        writer.write(canvas)
    writer.release()
    result = run("--models", models, "--device", "CPU", "--video", video, "--json", "--output", tmp_path / "out.mp4")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [f"{video}#{i}" for i in range(12)]
    assert sum(len(r["faces"]) == 1 for r in records) >= 10
    assert "FPS" in result.stderr.splitlines()[-1]
    assert cv2.VideoCapture(str(tmp_path / "out.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 12


# ---------------------------------------------------------------- error paths and exit codes
def test_no_face_is_reported_with_exit_code_3(models, tmp_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), cf.background(seed=3))
    result = run("--models", models, "--image", blank, "--json")
    assert result.returncode == run_inference.EXIT_NO_FACE == 3
    assert json.loads(result.stdout) == {**json.loads(result.stdout), "faces": []}
    assert "3" in run_inference.__doc__ and "no face" in run_inference.__doc__


def test_missing_model_folder(tmp_path):
    result = run("--models", tmp_path / "nowhere", "--image", tmp_path / "x.png")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "models folder not found" in result.stderr


def test_default_models_folder_is_found_beside_edge(tmp_path):
    """Run from another folder: --models models/ir resolves relative to the folder above edge/."""
    result = run("--image", tmp_path / "x.png", cwd=tmp_path)
    models_here = (REPO / "models" / "ir").is_dir()
    assert result.returncode == 2
    assert ("models folder not found" in result.stderr) != models_here


def test_missing_precision_lists_what_is_there(models, scene):
    result = run("--models", models, "--precision", "INT8", "--image", scene[0])
    assert result.returncode == 2 and "INT8" in result.stderr and "FP16, FP32" in result.stderr


def test_mismatched_model_files(models, scene, tmp_path):
    mixed = tmp_path / "ir"
    shutil.copytree(models, mixed)
    age = mixed / "age_net/FP16"
    shutil.copy(mixed / "gender_net/FP16/gender_net.json", age / "age_net.json")
    result = run("--models", mixed, "--image", scene[0])
    assert result.returncode == 2 and "mismatched model files" in result.stderr and result.stderr.count("\n") == 1

    shutil.copy(models / "age_net/FP16/age_net.json", age / "age_net.json")
    shutil.copy(mixed / "gender_net/FP16/gender_net.xml", age / "age_net.xml")  # gender graph, age weights
    result = run("--models", mixed, "--image", scene[0])
    assert result.returncode == 2 and "age_net" in result.stderr and result.stderr.count("\n") == 1

    shutil.copy(models / "age_net/FP16/age_net.xml", age / "age_net.xml")
    result = run("--models", mixed, "--engine", "opencv", "--caffe-model",
                 f"age={json.loads((models / 'gender_net/FP16/gender_net.json').read_text())['caffe']['caffemodel']}",
                 "--image", scene[0])
    assert result.returncode == 2 and "sha256" in result.stderr


def test_unreadable_image(models, tmp_path, scene):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    result = run("--models", models, "--image", bad, scene[0])
    assert result.returncode == 2
    assert f"error: {bad}: cannot read image" in result.stderr
    assert len(result.stdout.splitlines()) == 3  # the good image is still reported
    result = run("--models", models, "--image", tmp_path / "missing.jpg")
    assert result.returncode == 2 and "file not found" in result.stderr


def test_absent_device_lists_those_present(models, scene):
    result = run("--models", models, "--device", "MYRIAD", "--image", scene[0])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "device MYRIAD not available (present: CPU" in result.stderr


def test_needs_exactly_one_input_kind(models):
    result = run("--models", models)
    assert result.returncode == 2 and "exactly one input" in result.stderr


# ---------------------------------------------------------------- framing and the device's Python
def test_chip_framing_constant_matches_utkface(utkface_dir):
    """CHIP_SCALE and CHIP_SHIFT_Y come from running the cascade on UTKFace chips; re-measure a sample."""
    files = sorted(utkface_dir.glob("*.jpg"))
    random.Random(3).shuffle(files)
    ratio, shift, found, tried = face_detection.measure_framing(files[:60])
    assert found >= 0.8 * tried
    assert abs(ratio - face_detection.CHIP_SCALE) < 0.06 and abs(shift - face_detection.CHIP_SHIFT_Y) < 0.05


def test_chip_box_is_clipped_to_the_frame():
    # Away from the edges: 0.98 x the box, centred 0.08 box sides lower.
    assert face_detection.chip_box((100, 100, 100, 100), (480, 640)) == (101, 109, 98, 98)
    # At the bottom right corner the chip would leave the frame: clipped.
    x, y, w, h = face_detection.chip_box((560, 400, 80, 80), (480, 640))
    assert (x + w, y + h) == (639, 480) and h < w


def edge_sources():
    return sorted(EDGE.glob("*.py"))


def test_edge_imports_only_numpy_opencv_openvino():
    allowed = {"numpy", "cv2", "openvino"} | {p.stem for p in edge_sources()} | set(sys.stdlib_module_names)
    for source in edge_sources():
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name} imports {name}"


def test_edge_is_python_37_syntax():
    vermin = shutil.which("vermin") or str(Path(sys.executable).parent / "vermin")
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed (pip install vermin)")
    result = subprocess.run([vermin, "--no-tips", "-t=3.7-", "--violations", *map(str, edge_sources())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
