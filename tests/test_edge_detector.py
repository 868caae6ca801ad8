"""The runner with BlazeFace (`make detector`): faces in tilted and group photos found, each warped into the
chip framing the nets were trained on, --save-crops showing exactly that, ids kept across video frames,
the OpenCV-only fallback, and the Haar cascade when no detector was built."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe_fixtures as cf
from caffekit import detector, photos
from caffekit.errors import KitError

REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / "edge"
RUNNER = [sys.executable, str(EDGE / "run_inference.py")]
sys.path.insert(0, str(EDGE))

import face_detection  # noqa: E402


def wheel_or_skip():
    try:
        return detector.wheel_path()
    except KitError as exc:
        pytest.skip(f"the mediapipe wheel is not cached and cannot be downloaded: {exc}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/ir with the pair's IRs (random weights) and the BlazeFace detector built beside them."""
    wheel = wheel_or_skip()
    root = tmp_path_factory.mktemp("detector")
    _, models_dir = cf.make_ir_tree(root)
    detector.build(models_dir, wheel)
    return models_dir / "ir"


def run(*args):
    return subprocess.run([*RUNNER, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120)


def chip_of(utkface_dir, index=40):
    path = sorted(utkface_dir.glob("*.jpg"))[index]
    return cv2.imread(str(path)), path


def tilted_scene(chip, angle, path):
    """The chip rotated by ``angle`` degrees and pasted into a 640x480 grey frame."""
    frame = np.full((480, 640, 3), 90, np.uint8)
    matrix = cv2.getRotationMatrix2D((100, 100), angle, 1.0)
    matrix[:, 2] += [300 - 100, 240 - 100]
    warped = cv2.warpAffine(chip, matrix, (640, 480))
    mask = cv2.warpAffine(np.full((200, 200), 255, np.uint8), matrix, (640, 480)) > 127
    frame[mask] = warped[mask]
    cv2.imwrite(str(path), frame)
    return path


def correlation(a, b):
    a, b = (np.asarray(x, np.float64).ravel() for x in (a, b))
    a, b = a - a.mean(), b - b.mean()
    return float(a.dot(b) / np.sqrt(a.dot(a) * b.dot(b)))


def test_a_tilted_face_is_found_and_warped_back_upright_into_the_chip_framing(models, utkface_dir, tmp_path):
    chip, _ = chip_of(utkface_dir)
    scene = tilted_scene(chip, 25, tmp_path / "tilted.png")
    # What the nets saw in training: the chip resized to the training size, its centre crop.
    trained = face_detection.net_input(chip, (0, 0, 200, 200), 227, 256)
    similarity = {}
    for option in ([], ["--no-align"]):
        crops = tmp_path / ("crops" + "".join(option))
        result = run("--models", models, "--image", scene, "--json", "--save-crops", crops, *option)
        assert result.returncode == 0, result.stderr
        (face,) = json.loads(result.stdout)["faces"]
        assert face["index"] == 1 and face["score"] > 0.7 and len(face["keypoints"]) == 6
        x, y, w, h = face["box"]
        assert abs(x + w / 2 - 300) < 30 and abs(y + h / 2 - 240) < 30
        crop = cv2.imread(str(crops / "tilted_1.png"))
        assert crop.shape == trained.shape  # exactly what the nets receive
        similarity[bool(option)] = correlation(crop, trained)
    # Aligned: close to the upright chip (0.71 here; the rotated chip's corners are background now); the box
    # alone keeps the tilt (0.36).
    assert similarity[False] > 0.6 and similarity[False] > similarity[True] + 0.2, similarity


def alignment_error_degrees(detector, chip, angle, scale):
    """|rotation| left when ``detector``'s alignment of the chip, pasted at ``angle`` and ``scale``, is composed
    with the paste: 0 where its keypoints frame the face exactly as the template frames a chip."""
    from alignment import chip_matrix

    paste = cv2.getRotationMatrix2D((100, 100), angle, scale)
    paste[:, 2] += [320 - 100, 240 - 100]
    frame = np.full((480, 640, 3), 90, np.uint8)
    mask = cv2.warpAffine(np.full((200, 200), 255, np.uint8), paste, (640, 480)) > 127
    frame[mask] = cv2.warpAffine(chip, paste, (640, 480))[mask]
    faces = [face for face in detector.detect(frame) if face.keypoints is not None]
    if not faces:
        return None
    face = min(faces, key=lambda f: np.hypot(f.box[0] + f.box[2] / 2 - 320, f.box[1] + f.box[3] / 2 - 240))
    both = np.vstack([chip_matrix(face.keypoints, detector.framing.keypoint_names, detector.framing.template),
                      [0, 0, 1]]).dot(np.vstack([paste, [0, 0, 1]]))
    return abs(np.degrees(np.arctan2(both[1, 0], both[0, 0])))


def test_the_second_look_aligns_small_tilted_faces_closer_to_their_chip_framing(models, utkface_dir):
    # Small faces (0.55x of a chip, 110 px in 640x480) tilted by 25 degrees: the short-range model's keypoints
    # on them are a few degrees off; looked at again upright at the template's own size, less (the alignment
    # error, measured as the rotation left over once the known paste is undone).
    first = face_detection.load_detector(str(models), "blazeface", "short", refine=False)
    second = face_detection.load_detector(str(models), "blazeface", "short", refine=True)
    errors = {False: [], True: []}
    for index in range(0, 240, 20):
        chip, _ = chip_of(utkface_dir, index)
        for angle in (25, -25):
            pair = [alignment_error_degrees(detector, chip, angle, 0.55) for detector in (first, second)]
            if None not in pair:
                errors[False].append(pair[0])
                errors[True].append(pair[1])
    assert len(errors[True]) >= 16
    before, after = np.median(errors[False]), np.median(errors[True])
    assert after < before and after < 3.0, (before, after)


def test_haar_is_the_fallback_without_a_built_detector_and_blazeface_then_says_how_to_build(utkface_dir, tmp_path):
    _, models_dir = cf.make_ir_tree(tmp_path)
    _, chip_path = chip_of(utkface_dir)
    scene = tmp_path / "upright.png"
    frame = np.full((480, 640, 3), 90, np.uint8)
    frame[140:340, 200:400] = cv2.imread(str(chip_path))
    cv2.imwrite(str(scene), frame)
    result = run("--models", models_dir / "ir", "--image", scene, "--json")
    assert result.returncode == 0, result.stderr
    (face,) = json.loads(result.stdout)["faces"]
    assert "keypoints" not in face and "score" not in face  # the cascade gives neither
    refused = run("--models", models_dir / "ir", "--image", scene, "--detector", "blazeface")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "make detector" in refused.stderr


@pytest.mark.parametrize("photo", photos.PHOTOS, ids=lambda p: p.name)
def test_every_face_of_a_real_group_photo_is_found(models, photo, tmp_path):
    try:
        path = photos.fetch(photo)
    except KitError as exc:
        pytest.skip(f"{photo.name}: cannot fetch it from {photo.requirement}: {exc}")
    result = run("--models", models, "--image", path, "--json", "--save-crops", tmp_path)
    assert result.returncode == 0, result.stderr
    faces = json.loads(result.stdout)["faces"]
    assert len(faces) == len(photo.boxes) == photos.matched(photo, [f["box"] for f in faces]), faces
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{path.stem}_{face['index']}.png" for face in faces)


def test_the_opencv_only_runner_detects_with_the_tflite_model(models, utkface_dir, tmp_path):
    """A device with numpy and OpenCV alone: BlazeFace short range through cv2.dnn.readNetFromTFLite."""
    chip, _ = chip_of(utkface_dir)
    scene = tilted_scene(chip, -20, tmp_path / "tilted.png")
    answers = {}
    for engine in ("openvino", "opencv"):
        result = run("--models", models, "--image", scene, "--json", "--engine", engine, "--range", "short",
                     "--precision", "FP32")
        assert result.returncode == 0, result.stderr
        (face,) = json.loads(result.stdout)["faces"]
        answers[engine] = face
    assert answers["openvino"]["box"] == answers["opencv"]["box"]
    # Within a pixel: on CPUs with AVX512-BF16 or AMX OpenVINO runs even the FP32 IR in bf16 (its default; a Zen 5
    # put one keypoint 0.6 px from OpenCV's f32), while a wrong decode would be many pixels off.
    np.testing.assert_allclose(answers["openvino"]["keypoints"], answers["opencv"]["keypoints"], atol=1.0)
    refused = run("--models", models, "--image", scene, "--engine", "opencv", "--range", "full")
    assert refused.returncode == 2 and "needs OpenVINO" in refused.stderr


def test_a_face_moving_through_a_video_keeps_one_track_id(models, utkface_dir, tmp_path):
    chip, _ = chip_of(utkface_dir)
    clip = cf.walking_face_video(tmp_path / "walk.avi", chip, 12, 25)
    result = run("--models", models, "--video", clip, "--json", "--save-crops", tmp_path / "crops")
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(frames) == 12 and all(len(f["faces"]) == 1 for f in frames)
    assert {f["faces"][0]["track"] for f in frames} == {1}
    for f in frames:  # the label shown is the track's mean; the frame's own answer stays beside it
        face = f["faces"][0]
        assert set(face["raw"]) == {"age", "age_prob", "age_years", "gender", "gender_prob"}
    first, last = frames[0]["faces"][0], frames[-1]["faces"][0]
    assert first["age_prob"] == pytest.approx(first["raw"]["age_prob"])  # one frame: the mean is itself
    assert last["box"][0] > first["box"][0] + 200
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == [f"walk_{i:06d}_1.png" for i in range(12)]


def test_save_crops_into_a_path_that_is_a_file_is_one_error_line(models, utkface_dir, tmp_path):
    chip, _ = chip_of(utkface_dir)
    scene = tilted_scene(chip, 0, tmp_path / "scene.png")
    blocker = tmp_path / "not a folder"
    blocker.write_text("x")
    result = run("--models", models, "--image", scene, "--save-crops", blocker / "crops")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr
    shutil.rmtree(tmp_path / "crops", ignore_errors=True)


def test_the_chip_template_matches_a_fresh_measurement_on_utkface(models, utkface_dir):
    """edge/alignment.py's CHIP_TEMPLATE (written into face_detector.json) against BlazeFace run again on
    other UTKFace chips than those it was measured on."""
    import alignment
    import blazeface

    chips = sorted(utkface_dir.glob("*.jpg"))[::97][:60]
    measured, found, tried = alignment.measure_template(
        chips, blazeface.BlazeFace(blazeface.read_detector_json(str(models)), "short_range", "opencv"))
    assert found >= 0.95 * tried
    for name, (x, y) in alignment.CHIP_TEMPLATE["keypoints"].items():
        assert abs(measured["keypoints"][name][0] - x) < 0.03 and abs(measured["keypoints"][name][1] - y) < 0.03
    assert abs(measured["box_scale"] - alignment.CHIP_TEMPLATE["box_scale"]) < 0.05


def test_a_detector_folder_missing_a_file_or_damaged_is_one_error_line(models, utkface_dir, tmp_path):
    chip, _ = chip_of(utkface_dir)
    scene = tilted_scene(chip, 0, tmp_path / "scene.png")
    copy = tmp_path / "ir"
    shutil.copytree(models, copy)
    removed = copy / "face_detector" / "FP32" / "face_detection_short_range.xml"
    removed.unlink()
    result = run("--models", copy, "--image", scene)
    assert result.returncode == 2 and result.stderr == f"error: {removed}: missing (copy models/ir/face_detector/ " \
        "whole, or rebuild it with `make detector`)\n"
    (copy / "face_detector" / "face_detector.json").write_text("{ not json")
    result = run("--models", copy, "--image", scene)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "face_detector.json" in result.stderr
