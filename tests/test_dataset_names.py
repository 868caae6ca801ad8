"""UTKFace name parsing and image checks (dataset/utkface.py)."""
import cv2
import numpy as np
import pytest

from dataset import utkface


@pytest.mark.parametrize("name, labels", [
    ("26_1_2_20170116174525125.jpg.chip.jpg", (26, 1, 2)),
    ("1_0_4_20161221193218960.jpg.chip.jpg", (1, 0, 4)),
    ("116_1_0_20170120134921760.jpg.chip.jpg", (116, 1, 0)),
    ("30_0_2_20170116174525125.jpg", (30, 0, 2)),  # the in-the-wild naming, without .chip.jpg
    # The public set's malformed names whose four fields are intact are recovered:
    ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, 0, 1)),  # a space before .jpg
    ("55_0_0_20170116232725357jpg.chip.jpg", (55, 0, 0)),  # a missing dot
])
def test_parse_name_reads_labels(name, labels):
    face, reason = utkface.parse_name(name)
    assert reason == ""
    assert (face.age, face.gender, face.race) == labels
    assert face.name == name


@pytest.mark.parametrize("name", [
    # The public set's three names with one label field missing: skipped, the missing field is ambiguous.
    "39_1_20170116174525125.jpg.chip.jpg",
    "61_1_20170109142408075.jpg.chip.jpg",
    "61_1_20170109150557335.jpg.chip.jpg",
])
def test_three_field_names_are_skipped(name):
    face, reason = utkface.parse_name(name)
    assert face is None
    assert "3 label fields" in reason


@pytest.mark.parametrize("name, words", [
    ("117_0_2_20170116174525125.jpg.chip.jpg", "age 117 outside 0..116"),
    ("999_1_2_20170116174525125.jpg.chip.jpg", "age 999"),
    ("30_2_2_20170116174525125.jpg.chip.jpg", "gender 2"),
    ("30_0_5_20170116174525125.jpg.chip.jpg", "race 5"),
    ("README.txt", "not age_gender_race_datetime"),
    (".DS_Store", "not age_gender_race_datetime"),
    ("30_0_2_2017.png", "not age_gender_race_datetime"),
    ("a_0_2_20170116174525125.jpg.chip.jpg", "not age_gender_race_datetime"),
])
def test_bad_names_give_a_reason(name, words):
    face, reason = utkface.parse_name(name)
    assert face is None
    assert words in reason


def test_age_zero_is_accepted_and_binned():
    face, _ = utkface.parse_name("0_1_2_20170116174525125.jpg.chip.jpg")
    assert face.age == 0 and face.age_bin == 0
    face, _ = utkface.parse_name("95_1_2_20170116174525125.jpg.chip.jpg")
    assert face.age_bin == 8 and face.label("age") == 8 and face.label("gender") == 1


def test_race_names_match_utkface_codes():
    assert utkface.RACES == {"white": 0, "black": 1, "asian": 2, "indian": 3, "others": 4, "all": None}


def _jpeg(image) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


@pytest.fixture(scope="module")
def face_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return _jpeg(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))


def test_check_image_decodes_a_good_jpeg(face_jpeg):
    image, reason = utkface.check_image(face_jpeg)
    assert reason == "" and image.shape == (200, 200, 3) and image.dtype == np.uint8


def test_check_image_accepts_grey_jpegs_as_bgr():
    gradient = np.tile(np.arange(200, dtype=np.uint8), (200, 1))
    image, reason = utkface.check_image(_jpeg(gradient))
    assert reason == "" and image.shape == (200, 200, 3)


@pytest.mark.parametrize("make, words", [
    (lambda good: b"", "zero-byte"),
    (lambda good: good[: len(good) // 2], "truncated JPEG"),
    (lambda good: good[:-2], "truncated JPEG"),
    (lambda good: b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9", "not a readable image"),
    (lambda good: b"hello, this is not an image\n", "not a readable image"),
    (lambda good: _jpeg(np.full((200, 200, 3), 128, np.uint8)), "blank"),
    (lambda good: _jpeg(np.zeros((50, 80, 3), np.uint8)), "blank"),
])
def test_check_image_rejects_with_reason(face_jpeg, make, words):
    image, reason = utkface.check_image(make(face_jpeg))
    assert image is None
    assert words in reason


def test_resize_is_square_and_keeps_a_matching_size():
    image = np.random.default_rng(1).integers(0, 256, (200, 180, 3), dtype=np.uint8)
    assert utkface.resize(image, 64).shape == (64, 64, 3)
    square = image[:180]
    assert utkface.resize(square, 180) is square
