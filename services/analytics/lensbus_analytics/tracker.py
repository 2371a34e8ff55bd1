"""A ByteTrack-class multi-object tracker: a stable ``track_id`` per object across frames.

Each frame (``Tracker.update``, at the frame's capture time):

1. Every track's box is predicted to this frame's time by its Kalman filter
   (:mod:`lensbus_analytics.kalman`, real elapsed seconds: frames may be missing).
2. First pass: detections scoring ``high_score`` or more are matched to all tracks, tracked
   and lost alike, by IoU of the predicted boxes (an optimal assignment, scipy's
   ``linear_sum_assignment``), a match needing ``match_iou``.
3. Second pass (what makes it ByteTrack): detections between ``low_score`` and
   ``high_score`` (an object half hidden behind another scores low) are matched to the tracks
   seen in the previous update that the first pass left, with a stricter IoU (``SECOND_IOU``):
   a low score is trusted only where a track already is.
4. A track left unmatched is lost; it keeps being predicted and can be matched again until
   ``lost_s`` seconds after it was last seen, then it ends. An unmatched high-score
   detection scoring ``new_track_score`` or more starts a track with a new id (ids are never
   reused).

Matching is across labels, with a penalty (``LABEL_PENALTY``) when a detection's label
differs from the track's consensus: the detector's label flickers on one object (a dog
seen as a horse for a frame, a person on a bike as a bicycle), and a tracker that matched
only same labels would start a new id each flicker; the penalty still makes a same-label
detection win where two overlap (a person walking past a dog). tests/test_tracker.py
scores both choices alike on its sequence (``label_penalty`` None: labels must match).

A track's label is its consensus: the label held over most of its frames.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from lensbus.schemas.pipeline import TrackStage
from lensbus_analytics import kalman

Box = tuple[float, float, float, float]

# The second pass's least IoU: ByteTrack's 0.5 (a low-score box must sit on the track).
SECOND_IOU = 0.5
# Added to the cost (1 - IoU) of a detection whose label is not the track's.
LABEL_PENALTY = 0.3


@dataclass(frozen=True)
class Observation:
    """One detection of a result."""

    box: Box  # x1, y1, x2, y2 in frame pixels
    score: float
    label: str
    class_id: int


@dataclass
class TrackInfo:
    """What a tracked detection gets."""

    track_id: int  # >= 1, unique per Tracker, never reused
    label: str  # consensus: the label held over most of the track's frames
    since: float  # time (s) of the track's first frame
    box: Box  # the matched observation's box


@dataclass
class _Track:
    track_id: int
    since: float
    last_seen: float
    box: Box
    mean: kalman.Array
    cov: kalman.Array
    labels: Counter[str] = field(default_factory=Counter)
    label: str = ""

    def info(self) -> TrackInfo:
        return TrackInfo(self.track_id, self.label, self.since, self.box)

    def observe(self, obs: Observation, t: float) -> None:
        self.mean, self.cov = kalman.update(self.mean, self.cov, kalman.to_state(obs.box))
        self.box = obs.box
        self.last_seen = t
        self.labels[obs.label] += 1
        # a tie keeps the label held so far: a consensus does not flip on one frame
        if self.labels[obs.label] > self.labels[self.label]:
            self.label = obs.label


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), x1 y1 x2 y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _valid(obs: Observation) -> bool:
    x1, y1, x2, y2 = obs.box
    return all(math.isfinite(v) for v in obs.box) and x2 > x1 and y2 > y1


class Tracker:
    """Tracks of one camera; ``update`` once per frame, in capture-time order."""

    def __init__(self, stage: TrackStage, label_penalty: float | None = LABEL_PENALTY) -> None:
        self.stage = stage
        self.label_penalty = label_penalty
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._t: float | None = None
        self._active: list[_Track] = []

    def reconfigure(self, stage: TrackStage) -> None:
        """A pipeline change: the new settings apply from the next frame, tracks are kept."""
        self.stage = stage

    @property
    def active(self) -> list[TrackInfo]:
        """Tracks matched in the last update."""
        return [tr.info() for tr in self._active]

    def update(self, observations: list[Observation], t: float) -> list[TrackInfo | None]:
        """One frame at capture time ``t`` (seconds). Returns, per observation in order, its
        track or None (untracked: below ``low_score``, a label not tracked, a degenerate
        box, or unmatched and below ``new_track_score``)."""
        st = self.stage
        # a track unseen for longer than lost_s has ended: before matching, so it is not revived
        self._tracks = [tr for tr in self._tracks if t - tr.last_seen <= st.lost_s]
        self._predict(t)
        wanted = set(st.labels)
        usable = [
            i
            for i, o in enumerate(observations)
            if o.score >= st.low_score and (not wanted or o.label in wanted) and _valid(o)
        ]
        high = [i for i in usable if observations[i].score >= st.high_score]
        low = [i for i in usable if observations[i].score < st.high_score]
        out: list[TrackInfo | None] = [None] * len(observations)
        recent = {id(tr) for tr in self._active}
        matched: list[_Track] = []
        left = self._match(self._tracks, high, observations, st.match_iou, out, t, matched)
        second = [tr for tr in left if id(tr) in recent]
        self._match(second, low, observations, max(st.match_iou, SECOND_IOU), out, t, matched)
        for i in high:
            if out[i] is None and observations[i].score >= st.new_track_score:
                matched.append(self._start(observations[i], t))
                out[i] = matched[-1].info()
        self._active = matched
        return out

    def _predict(self, t: float) -> None:
        # frames arrive in order; a time going back (a camera's clock reset) predicts nothing
        dt = 0.0 if self._t is None else max(t - self._t, 0.0)
        self._t = t if self._t is None else max(t, self._t)
        if not self._tracks or dt == 0.0:
            return
        means = np.stack([tr.mean for tr in self._tracks])
        covs = np.stack([tr.cov for tr in self._tracks])
        means, covs = kalman.predict(means, covs, np.full(len(self._tracks), dt))
        for k, tr in enumerate(self._tracks):
            tr.mean, tr.cov = means[k], covs[k]
            if t - tr.last_seen > dt:
                # lost for more than this frame: its size stops changing, as in ByteTrack,
                # so an unseen box does not grow or shrink without bound
                tr.mean[6:] = 0.0

    def _match(
        self,
        tracks: list[_Track],
        dets: list[int],
        observations: list[Observation],
        min_iou: float,
        out: list[TrackInfo | None],
        t: float,
        matched: list[_Track],
    ) -> list[_Track]:
        """Assign ``dets`` to ``tracks``; fills ``out`` and ``matched``, returns the tracks
        left unmatched."""
        if not tracks or not dets:
            return list(tracks)
        predicted = kalman.to_boxes(np.stack([tr.mean for tr in tracks]))
        boxes = np.array([observations[i].box for i in dets], dtype=np.float64)
        iou = iou_matrix(predicted, boxes)
        cost = 1.0 - iou
        track_labels = np.array([tr.label for tr in tracks], dtype=object)
        det_labels = np.array([observations[i].label for i in dets], dtype=object)
        differs = track_labels[:, None] != det_labels[None, :]
        penalty = math.inf if self.label_penalty is None else self.label_penalty
        cost = np.where(differs, cost + penalty, cost)
        cost = np.where(iou >= min_iou, cost, 1e6)
        rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e6))
        taken: set[int] = set()
        for r, c in zip(rows, cols, strict=True):
            if cost[r, c] >= 1e6 or not math.isfinite(cost[r, c]):
                continue
            tr = tracks[r]
            tr.observe(observations[dets[c]], t)
            out[dets[c]] = tr.info()
            matched.append(tr)
            taken.add(r)
        return [tr for k, tr in enumerate(tracks) if k not in taken]

    def _start(self, obs: Observation, t: float) -> _Track:
        mean, cov = kalman.initiate(kalman.to_state(obs.box))
        track = _Track(self._next_id, t, t, obs.box, mean, cov)
        track.labels[obs.label] += 1
        track.label = obs.label
        self._next_id += 1
        self._tracks.append(track)
        return track
