"""Faces followed across the frames of a video or camera, so each keeps one id and a steady label.

A face in a new frame continues the track whose last box overlaps it most (intersection over union
at least MIN_IOU; pairs matched greedily, best overlap first); a face matching none starts a track;
a track unseen for MAX_MISSED frames ends. Each track keeps the class probabilities of its last
WINDOW frames, and the label shown is read from their mean: one frame's flicker (a blink, motion
blur) no longer flips a face's gender or age bin. The frame's own answers stay in the JSON ("raw").
"""
import collections
import itertools

import numpy as np

MIN_IOU = 0.3
MAX_MISSED = 10   # frames (a third of a second at 30 FPS): a face behind a passer-by keeps its id
WINDOW = 8        # frames averaged: about a quarter of a second at 30 FPS


def box_iou(a, b):
    """Intersection over union of two (x, y, w, h) boxes."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / float(union) if union > 0 else 0.0


class Track(object):
    def __init__(self, track_id, box, window):
        self.id, self.box, self.missed = track_id, box, 0
        self.history = collections.deque(maxlen=window)  # per frame: {key: probability vector or value}

    def mean(self):
        return dict((key, np.mean([values[key] for values in self.history], axis=0)) for key in self.history[0])


class Tracker(object):
    def __init__(self, min_iou=MIN_IOU, max_missed=MAX_MISSED, window=WINDOW):
        self.min_iou, self.max_missed, self.window = min_iou, max_missed, window
        self.tracks = []
        self._ids = itertools.count(1)

    def update(self, boxes, values):
        """One frame: ``boxes`` (x, y, w, h) and, per box, ``values`` {key: array} to smooth. Returns per
        box (track id, the values averaged over the track's recent frames, this one included)."""
        pairs = sorted(((box_iou(track.box, box), t, b) for t, track in enumerate(self.tracks)
                        for b, box in enumerate(boxes)), reverse=True)
        matched_tracks, assigned = set(), {}
        for overlap, t, b in pairs:
            if overlap < self.min_iou:
                break
            if t not in matched_tracks and b not in assigned:
                matched_tracks.add(t)
                assigned[b] = self.tracks[t]
        for t, track in enumerate(self.tracks):
            if t not in matched_tracks:
                track.missed += 1
        self.tracks = [track for t, track in enumerate(self.tracks)
                       if t in matched_tracks or track.missed <= self.max_missed]
        results = []
        for b, box in enumerate(boxes):
            track = assigned.get(b)
            if track is None:
                track = Track(next(self._ids), box, self.window)
                self.tracks.append(track)
            track.box, track.missed = box, 0
            track.history.append(values[b])
            results.append((track.id, track.mean()))
        return results
