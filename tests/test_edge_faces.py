"""The runner's face finding in NumPy, on cases checkable by hand: BlazeFace's anchors, decoding and
weighted non-maximum suppression, the letterbox, the similarity transform of the alignment, and the
tracker that keeps a face's id across frames."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "edge"))

import alignment  # noqa: E402
import blazeface  # noqa: E402
import tracking  # noqa: E402


def test_short_range_anchors_are_two_per_cell_on_16x16_then_six_per_cell_on_8x8():
    anchors = blazeface.ssd_anchors([8, 16, 16, 16], 128)
    assert anchors.shape == (896, 2)  # 16 * 16 * 2 + 8 * 8 * 6, the model's output count
    np.testing.assert_allclose(anchors[0], anchors[1])             # two anchors share the first cell
    np.testing.assert_allclose(anchors[0], [0.5 / 16, 0.5 / 16])   # its centre
    np.testing.assert_allclose(anchors[2], [1.5 / 16, 0.5 / 16])   # x runs fastest
    np.testing.assert_allclose(anchors[32], [0.5 / 16, 1.5 / 16])  # then the next row
    np.testing.assert_allclose(anchors[512:518], [[0.5 / 8, 0.5 / 8]] * 6)
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_full_range_anchors_are_one_per_cell_on_48x48():
    anchors = blazeface.ssd_anchors([4], 192, interpolated_scale_aspect_ratio=0.0)
    assert anchors.shape == (2304, 2)
    np.testing.assert_allclose(anchors[1], [1.5 / 48, 0.5 / 48])


def test_decode_turns_regressors_into_boxes_and_keypoints_around_their_anchor():
    anchors = blazeface.ssd_anchors([8, 16, 16, 16], 128)
    regressors = np.zeros((896, 16), np.float32)
    scores = np.full((896, 1), -10.0, np.float32)  # sigmoid(-10): nothing
    k = 2 * (5 * 16 + 7)  # the cell at x = 7, y = 5: centre ((7.5) / 16, (5.5) / 16)
    regressors[k, :4] = [12.8, -6.4, 32.0, 64.0]   # shift (+0.1, -0.05), size 0.25 x 0.5 of the input
    regressors[k, 4:6] = [-12.8, 0.0]              # first keypoint 0.1 left of the anchor
    scores[k] = 2.0
    boxes, keypoints, probabilities = blazeface.decode(regressors, scores, anchors, 128, 100.0, 0.5, 6)
    assert len(boxes) == 1
    cx, cy = 7.5 / 16 + 0.1, 5.5 / 16 - 0.05
    np.testing.assert_allclose(boxes[0], [cx - 0.125, cy - 0.25, cx + 0.125, cy + 0.25], atol=1e-6)
    np.testing.assert_allclose(keypoints[0, 0], [7.5 / 16 - 0.1, 5.5 / 16], atol=1e-6)
    np.testing.assert_allclose(keypoints[0, 1], [7.5 / 16, 5.5 / 16], atol=1e-6)  # zero offset: the anchor
    assert probabilities[0] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_decode_clips_huge_logits_instead_of_overflowing():
    anchors = blazeface.ssd_anchors([8, 16, 16, 16], 128)
    scores = np.full((896, 1), -1e4, np.float32)
    scores[0] = 1e4
    with np.errstate(all="raise"):
        _, _, probabilities = blazeface.decode(np.zeros((896, 16), np.float32), scores, anchors, 128, 100.0, 0.5, 6)
    assert probabilities.tolist() == [1.0]


def test_weighted_nms_merges_overlapping_boxes_by_score_and_keeps_separate_ones():
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [3.0, 3.0, 4.0, 4.0]])
    keypoints = np.zeros((3, 6, 2))
    keypoints[1] += 1.0
    scores = np.array([0.6, 0.9, 0.7])
    merged = blazeface.weighted_nms(boxes, keypoints, scores, 0.3)
    assert [score for _, _, score in merged] == [0.9, 0.7]  # best first, each with its best member's score
    np.testing.assert_allclose(merged[0][0], (0.6 * boxes[0] + 0.9 * boxes[1]) / 1.5)
    np.testing.assert_allclose(merged[0][1], np.full((6, 2), 0.9 / 1.5))
    np.testing.assert_allclose(merged[1][0], boxes[2])


def test_letterbox_keeps_the_aspect_and_centres_the_frame():
    frame = np.full((100, 200, 3), 255, np.uint8)
    square, (scale, pad_x, pad_y) = blazeface.letterbox(frame, 128)
    assert square.shape == (128, 128, 3) and scale == pytest.approx(0.64) and (pad_x, pad_y) == (0, 32)
    assert square[31].max() == 0 and square[32].min() == 255 and square[95].min() == 255 and square[96].max() == 0


def test_similarity_recovers_a_rotation_scale_and_shift():
    angle, scale, shift = np.radians(20), 1.7, np.array([30.0, -12.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = np.array([[10.0, 20.0], [50.0, 22.0], [30.0, 60.0]])
    target = source.dot(rotation.T) + shift
    np.testing.assert_allclose(alignment.similarity(source, target), np.hstack([rotation, shift[:, None]]),
                               atol=1e-9)


def test_aligned_chip_puts_the_eyes_and_mouth_where_the_template_has_them():
    # A frame with three dots at a rotated, scaled copy of the template's eyes and mouth.
    template = alignment.CHIP_TEMPLATE
    names = ["right_eye", "left_eye", "nose_tip", "mouth_centre", "right_ear_tragion", "left_ear_tragion"]
    points = np.array([template["keypoints"][n] for n in names]) * 150
    angle = np.radians(-25)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    in_frame = points.dot(rotation.T) + [200, 120]
    frame = np.zeros((400, 500, 3), np.uint8)
    for x, y in in_frame[[0, 1, 3]]:
        frame[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2] = 255
    chip = alignment.aligned_chip(frame, in_frame, names, template, 100)
    assert chip.shape == (100, 100, 3)
    for name in alignment.ALIGN_KEYPOINTS:
        x, y = np.array(template["keypoints"][name]) * 100
        assert chip[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].max() > 100, name


def test_tracker_keeps_ids_while_faces_move_and_averages_their_answers():
    tracker = tracking.Tracker(window=3)
    a, b = (100, 100, 80, 80), (400, 100, 80, 80)
    first = tracker.update([a, b], [{"p": np.array([1.0, 0.0])}, {"p": np.array([0.0, 1.0])}])
    assert [track for track, _ in first] == [1, 2]
    moved = [(410, 105, 80, 80), (108, 102, 80, 80)]  # both moved a little, listed in the other order
    second = tracker.update(moved, [{"p": np.array([0.0, 1.0])}, {"p": np.array([0.0, 1.0])}])
    assert [track for track, _ in second] == [2, 1]
    np.testing.assert_allclose(second[1][1]["p"], [0.5, 0.5])  # face 1: the mean of its two frames
    third = tracker.update([(700, 300, 50, 50)], [{"p": np.array([1.0, 0.0])}])
    assert third[0][0] == 3  # a face where none was: a new track


def test_tracker_ends_a_track_unseen_for_longer_than_max_missed():
    tracker = tracking.Tracker(max_missed=2)
    box = (100, 100, 80, 80)
    assert tracker.update([box], [{"p": np.ones(1)}])[0][0] == 1
    for _ in range(2):
        tracker.update([], [])
    assert tracker.update([box], [{"p": np.ones(1)}])[0][0] == 1  # back within 2 frames: the same face
    for _ in range(3):
        tracker.update([], [])
    assert tracker.update([box], [{"p": np.ones(1)}])[0][0] == 2
