"""The edge runner on the stack of a Raspberry Pi with a Neural Compute Stick 2: Python 3.7, OpenVINO 2022.3 (the
last release with the MYRIAD plugin; it reads the kit's IRs, opset 8 or lower), OpenCV 4.8, in the environment
`make edge-legacy` builds. The same faces, boxes and answers as the current stack gives, through OpenVINO and
through the OpenCV-only fallback, on a photo and on a video."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe_fixtures as cf
from caffekit import detector
from caffekit.errors import KitError

REPO = Path(__file__).resolve().parents[1]
LEGACY_PYTHON = REPO / ".venv-edge-legacy" / "bin" / "python"
RUNNER = str(REPO / "edge" / "run_inference.py")


@pytest.fixture(scope="module")
def legacy():
    if not (LEGACY_PYTHON.parent.parent / "pins.txt").is_file():
        pytest.skip(f"no {LEGACY_PYTHON.parent.parent}: `make edge-legacy` builds it where a Python 3.7 is found")
    versions = subprocess.run([str(LEGACY_PYTHON), "-c", "import sys, cv2, openvino.runtime as ov; "
                               "print(sys.version_info[:2], ov.get_version().split('-')[0], cv2.__version__)"],
                              capture_output=True, text=True, timeout=120)
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.split()[:2] == ["(3,", "7)"] and "2022.3" in versions.stdout, versions.stdout
    return str(LEGACY_PYTHON)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/ir with the pair's IRs (random weights) and the BlazeFace detector built beside them."""
    try:
        wheel = detector.wheel_path()
    except KitError as exc:
        pytest.skip(f"the mediapipe wheel is not cached and cannot be downloaded: {exc}")
    root = tmp_path_factory.mktemp("legacy")
    _, models_dir = cf.make_ir_tree(root)
    detector.build(models_dir, wheel)
    return models_dir / "ir"


def run(python, *args):
    result = subprocess.run([python, RUNNER, *map(str, args), "--json"], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def scene(utkface_dir, path, angle=20):
    """Two UTKFace chips, one tilted, in a 640x480 frame."""
    frame = np.full((480, 640, 3), 90, np.uint8)
    chips = sorted(utkface_dir.glob("*.jpg"))
    for i, (x, tilt) in enumerate(((160, angle), (470, 0))):
        chip = cv2.imread(str(chips[40 + 60 * i]))
        matrix = cv2.getRotationMatrix2D((100, 100), tilt, 0.9)
        matrix[:, 2] += [x - 100, 240 - 100]
        mask = cv2.warpAffine(np.full((200, 200), 255, np.uint8), matrix, (640, 480)) > 127
        frame[mask] = cv2.warpAffine(chip, matrix, (640, 480))[mask]
    cv2.imwrite(str(path), frame)
    return path


def assert_same_faces(legacy_faces, current_faces):
    assert len(legacy_faces) == len(current_faces) > 0
    for old, new in zip(legacy_faces, current_faces):
        assert np.abs(np.subtract(old["box"], new["box"])).max() <= 2, (old["box"], new["box"])
        for key in ("age_prob", "gender_prob"):
            np.testing.assert_allclose(old[key], new[key], atol=0.03)


@pytest.mark.parametrize("engine", ["openvino", "opencv"])
def test_the_runner_on_python37_and_openvino_2022_3_finds_and_answers_as_on_the_current_stack(
        legacy, models, utkface_dir, tmp_path, engine):
    image = scene(utkface_dir, tmp_path / "two.png")
    options = ("--models", models, "--image", image, "--engine", engine, "--precision", "FP32")
    (old,), (new,) = run(legacy, *options), run(sys.executable, *options)
    assert len(old["faces"]) == 2
    assert_same_faces(old["faces"], new["faces"])


def test_a_video_on_python37_and_openvino_2022_3_keeps_its_tracks(legacy, models, utkface_dir, tmp_path):
    chip = cv2.imread(str(sorted(utkface_dir.glob("*.jpg"))[40]))
    clip = cf.walking_face_video(tmp_path / "walk.avi", chip, 8, 30)
    old = run(legacy, "--models", models, "--video", clip, "--precision", "FP32")
    new = run(sys.executable, "--models", models, "--video", clip, "--precision", "FP32")
    assert len(old) == len(new) == 8 and {f["faces"][0]["track"] for f in old} == {1}
    for old_frame, new_frame in zip(old, new):
        assert_same_faces(old_frame["faces"], new_frame["faces"])
