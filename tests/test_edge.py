"""edge/run_inference.py as a user runs it (a subprocess), on real UTKFace faces and random-weight IRs."""
import ast
import json
import os
import random
import shutil
import signal
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


def write_clip(path, chips, frames, fps):
    """An MJPG clip of ``frames`` frames at ``fps``: the chips' face moving right across a background."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 480))
    for i in range(frames):
        canvas = cf.background(seed=0)
        cf.paste_faces(canvas, chips, [(40 + 20 * i, 120)], FACE_SIDE)
        writer.write(canvas)
    writer.release()
    return path


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
    video = write_clip(tmp_path / "clip.avi", chips, 12, 25)
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


def test_no_face_in_one_image_exits_3_and_the_others_are_still_reported(models, scene, tmp_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), cf.background(seed=3))
    result = run("--models", models, "--image", blank, scene[0], "--json")
    assert result.returncode == 3, result.stderr
    records = {r["image"]: r["faces"] for r in map(json.loads, result.stdout.splitlines())}
    assert records[str(blank)] == [] and len(records[str(scene[0])]) == len(scene[1])


def test_missing_model_folder(tmp_path):
    result = run("--models", tmp_path / "nowhere", "--image", tmp_path / "x.png")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "models folder not found" in result.stderr


def copy_of_edge(folder, models=None):
    """``folder``/edge (a copy of edge/), with ``folder``/models/ir linked to ``models`` if given:
    the default --models then depends on this copy only, not on what the repository holds."""
    shutil.copytree(EDGE, folder / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    if models is not None:
        (folder / "models").mkdir()
        (folder / "models" / "ir").symlink_to(models, target_is_directory=True)
    return [sys.executable, str(folder / "edge" / "run_inference.py")]


def test_default_models_folder_is_found_beside_edge(models, scene, tmp_path):
    """Run from another folder: --models models/ir resolves relative to the folder above edge/."""
    runner = copy_of_edge(tmp_path / "kit", models)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([*runner, "--image", str(scene[0])], capture_output=True, text=True, cwd=elsewhere,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(scene[1])


def test_default_models_folder_absent_beside_edge_is_reported(scene, tmp_path):
    runner = copy_of_edge(tmp_path / "kit")
    result = subprocess.run([*runner, "--image", str(scene[0])], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr == "error: models/ir: models folder not found (compile with `make compile-ncs`, " \
                            "or pass --models DIR)\n"


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


def one_error_line(result):
    """The runner's stderr is exactly one line starting with "error: " (no traceback, no library warning)."""
    return result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can create files in; root ignores mode bits, so there the immutable flag is set too."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and \
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            yield folder
        else:
            (folder / "probe").unlink()
            pytest.skip("cannot make a read-only folder here (root without chattr +i)")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def many_faces(utkface_dir, tmp_path_factory):
    """A folder of 300 UTKFace chips (6 files, 50 copies each): several seconds of work for the runner."""
    folder = tmp_path_factory.mktemp("many")
    _, files = face_chips(utkface_dir, 6, seed=2)
    for i in range(300):
        shutil.copy(files[i % len(files)], folder / "{:03d}.jpg".format(i))
    return folder


# ---------------------------------------------------------------- stopping with requests in flight
def test_ctrl_c_while_requests_are_in_flight_exits_130(models, many_faces):
    process = subprocess.Popen([*RUNNER, "--models", str(models), "--device", "CPU", "--dir", str(many_faces),
                                "--no-detect"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = process.stdout.readline()  # a result printed: the run has started, most images still to go
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert first and len(rest.splitlines()) < 299  # stopped early, not after the whole folder
    assert process.returncode == 130 and stderr == "interrupted\n"


@pytest.mark.skipif("NONE" not in next((l for l in cv2.getBuildInformation().splitlines() if "GUI:" in l), "NONE"),
                    reason="this OpenCV has a GUI, so --show does not fail")
def test_error_while_requests_are_in_flight_exits_2_with_one_line(models, many_faces):
    """--show with a headless OpenCV fails at the first result, while later images are on the nets."""
    result = run("--models", models, "--device", "CPU", "--dir", many_faces, "--no-detect", "--show")
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert "--show needs an OpenCV build with a GUI" in result.stderr


def test_read_only_output_folder_is_one_error_line_before_any_image(models, many_faces, read_only_folder):
    result = run("--models", models, "--device", "CPU", "--dir", many_faces, "--no-detect", "--output",
                 read_only_folder)
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr.startswith("error: {}: cannot write".format(read_only_folder)) and result.stdout == ""


# ---------------------------------------------------------------- one-line errors
def test_output_whose_parent_is_a_file_is_one_error_line(models, scene):
    target = scene[0] / "x.png"
    result = run("--models", models, "--image", scene[0], "--output", target)
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr == "error: {}: {} is a file, not a folder\n".format(target, scene[0])


def test_output_under_a_read_only_folder_is_one_error_line(models, scene, read_only_folder):
    target = read_only_folder / "newsub" / "out.png"
    result = run("--models", models, "--image", scene[0], "--output", target)
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr.startswith("error: {}: cannot create the folder {} (".format(target, target.parent))


def with_age_json(models, folder, edit):
    """A copy of ``models`` whose FP16 age_net.json is ``edit``(the original JSON)."""
    copy = folder / "ir"
    shutil.copytree(models, copy)
    path = copy / "age_net/FP16/age_net.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return copy, path


@pytest.mark.parametrize("key", ["input", "precision", "outputs"])
def test_model_json_without_a_key_names_the_file_and_the_key(models, scene, tmp_path, key):
    copy, path = with_age_json(models, tmp_path, lambda meta: {k: v for k, v in meta.items() if k != key})
    result = run("--models", copy, "--image", scene[0])
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr == 'error: {}: no "{}" (not a model metadata file of this kit, or a damaged one)\n'.format(
        path, key)


def test_model_json_with_a_wrong_type_names_the_file_and_the_key(models, scene, tmp_path):
    copy, path = with_age_json(models, tmp_path, lambda meta: dict(meta, input={"shape": "227x227"}))
    result = run("--models", copy, "--image", scene[0])
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr.startswith('error: {}: "input.shape" should be'.format(path))


def test_model_json_that_is_a_list_is_one_error_line(models, scene, tmp_path):
    copy, path = with_age_json(models, tmp_path, lambda meta: [meta])
    result = run("--models", copy, "--image", scene[0])
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr == "error: {}: not a model metadata file of this kit (a JSON list, not an object)\n".format(
        path)


# ---------------------------------------------------------------- option errors
def test_negative_camera_number_is_an_option_error(models):
    result = run("--models", models, "--camera", "-1")
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert "--camera" in result.stderr and "0 or more" in result.stderr


@pytest.mark.parametrize("count", ["0", "-1"])
def test_max_frames_below_1_is_an_option_error(models, utkface_dir, tmp_path, count):
    chips, _ = face_chips(utkface_dir, 1, seed=1)
    video = write_clip(tmp_path / "clip.avi", chips, 3, 25)
    result = run("--models", models, "--video", video, "--max-frames", count)
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert "--max-frames" in result.stderr and "1 or more" in result.stderr


# ---------------------------------------------------------------- what is wrong, said as it is
def test_dir_reports_broken_links_link_loops_and_subfolders_for_what_they_are(models, utkface_dir, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    _, (chip,) = face_chips(utkface_dir, 1, seed=2)
    shutil.copy(chip, folder / "a.jpg")
    (folder / "b.jpg").symlink_to(folder / "gone.jpg")
    (folder / "c.jpg").symlink_to(folder / "d.jpg")
    (folder / "d.jpg").symlink_to(folder / "c.jpg")
    (folder / "e.jpg").mkdir()
    result = run("--models", models, "--dir", folder, "--no-detect")
    assert result.returncode == 2 and len(result.stdout.splitlines()) == 1  # a.jpg still reported
    assert result.stderr.splitlines() == [
        "error: {}: broken link (its target {} does not exist)".format(folder / "b.jpg", folder / "gone.jpg"),
        "error: {}: link loop (a symbolic link that leads back to itself)".format(folder / "c.jpg"),
        "error: {}: link loop (a symbolic link that leads back to itself)".format(folder / "d.jpg"),
        "error: {}: a folder, not an image (subfolders are not searched)".format(folder / "e.jpg")]


def test_image_given_a_folder_suggests_dir(models, tmp_path):
    result = run("--models", models, "--image", tmp_path)
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr == "error: {}: a folder, not an image (use --dir for the images in a folder)\n".format(
        tmp_path)


def test_output_with_an_unknown_suffix_is_rejected(models, scene, tmp_path):
    target = tmp_path / "out.xyz"
    result = run("--models", models, "--image", scene[0], "--output", target)
    assert result.returncode == 2 and one_error_line(result), result.stderr
    assert result.stderr.startswith("error: --output {}: unknown suffix .xyz (an image file ends in .jpg".format(
        target))
    assert "a folder has no suffix or ends in /" in result.stderr and not target.exists()


@pytest.mark.parametrize("name", ["annotated", "annotated.v2/"])
def test_output_without_suffix_or_ending_in_slash_is_a_folder(models, scene, tmp_path, name):
    result = run("--models", models, "--image", scene[0], "--output", str(tmp_path) + "/" + name)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / name.rstrip("/") / "three faces.png").is_file()


def test_unreadable_video_and_absent_camera_print_only_the_error_line(models, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    result = run("--models", models, "--video", bad)
    assert result.returncode == 2 and one_error_line(result), result.stderr  # no ffmpeg "moov atom" line
    absent = next(n for n in range(64, 128) if not os.path.exists("/dev/video{}".format(n)))
    result = run("--models", models, "--camera", absent)
    assert result.returncode == 2 and one_error_line(result), result.stderr  # no OpenCV [ WARN ] lines


def test_write_failure_of_one_image_is_reported_and_the_others_still_processed(models, scene, utkface_dir,
                                                                                tmp_path):
    _, (chip,) = face_chips(utkface_dir, 1, seed=2)
    out = tmp_path / "out"
    (out / "three faces.png").mkdir(parents=True)  # a folder where the scene's annotated copy should go
    result = run("--models", models, "--image", scene[0], chip, "--output", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: {}: cannot write image (".format(out / "three faces.png"))
    assert one_error_line(result), result.stderr
    assert len(result.stdout.splitlines()) == len(scene[1]) + 1  # both images reported
    assert (out / (chip.name[:-len(".jpg")] + ".png")).is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(["three faces.png", chip.name[:-len(".jpg")] + ".png"])


def test_annotated_image_replaces_the_target_instead_of_writing_into_it(models, scene, tmp_path):
    """A reader of the old file never sees a half-written one: a new file is renamed over it."""
    target, other_name = tmp_path / "out.png", tmp_path / "same file.png"
    target.write_bytes(b"old")
    os.link(target, other_name)  # a second name of the old file: writing into the file would change it too
    result = run("--models", models, "--image", scene[0], "--output", target)
    assert result.returncode == 0, result.stderr
    assert other_name.read_bytes() == b"old" and cv2.imread(str(target)).shape == (480, 640, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "same file.png"]  # no temporary left


def test_annotated_video_keeps_the_input_frame_rate(models, utkface_dir, tmp_path):
    chips, _ = face_chips(utkface_dir, 1, seed=1)
    video = write_clip(tmp_path / "clip.avi", chips, 4, 10)
    result = run("--models", models, "--device", "CPU", "--video", video, "--output", tmp_path / "out.mp4")
    assert result.returncode == 0, result.stderr
    assert cv2.VideoCapture(str(tmp_path / "out.mp4")).get(cv2.CAP_PROP_FPS) == 10


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
