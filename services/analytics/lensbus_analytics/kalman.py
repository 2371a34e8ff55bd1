"""A constant-velocity Kalman filter on boxes, for the tracker (SORT/ByteTrack's model).

The state is ``(cx, cy, w, h, vcx, vcy, vw, vh)``: a box's centre and size in frame pixels
and their velocities in pixels per second. ByteTrack filters (cx, cy, aspect, h); we filter
w and h directly (as BoT-SORT does), which follows a box whose width changes on its own (a
person turning, a car seen side-on then head-on) without the aspect's coupling.

Time is real seconds, not frames: a camera drops frames and its rate changes, so each
prediction uses the elapsed time ``dt`` and the process noise grows with it (a random walk
on velocity). The noise scales with the box's height, as in SORT: a near, large object
moves more pixels per second than a far, small one.

All tracks are predicted at once (``predict`` on stacked arrays): with 100 tracks a frame,
a loop over 8x8 matrices per track would cost more than the assignment itself.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

# Standard deviations, as fractions of the box's height. Measurement: a detector's box edges
# wobble by a few percent of its size. Process: position by ~h/20 over a second, velocity
# by ~h/s over a second (a walker stopping, turning); both per sqrt(second).
MEASURE_STD = 0.05
POSITION_STD = 0.05
VELOCITY_STD = 1.0
# A new track's velocity is unknown: a speed of a few box heights per second is plausible.
INIT_VELOCITY_STD = 2.0
# The smallest height the noise is scaled by: a degenerate box must not zero the covariance.
MIN_SCALE = 1.0

_H = np.hstack([np.eye(4), np.zeros((4, 4))])


def to_state(box: tuple[float, float, float, float]) -> Array:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = box
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=np.float64)


def to_boxes(means: Array) -> Array:
    """Rows of (cx, cy, w, h, ...) -> rows of (x1, y1, x2, y2)."""
    cx, cy = means[:, 0], means[:, 1]
    w, h = np.maximum(means[:, 2], 0.0), np.maximum(means[:, 3], 0.0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def initiate(measurement: Array) -> tuple[Array, Array]:
    """A new track's mean and covariance from its first box (cx, cy, w, h)."""
    mean = np.concatenate([measurement, np.zeros(4)])
    s = max(float(measurement[3]), MIN_SCALE)
    std = np.array([2 * MEASURE_STD * s] * 4 + [INIT_VELOCITY_STD * s] * 4)
    return mean, np.diag(std**2)


def predict(means: Array, covs: Array, dts: Array) -> tuple[Array, Array]:
    """Every track ``dts[i]`` seconds ahead: means (N, 8), covs (N, 8, 8), dts (N,)."""
    n = means.shape[0]
    if n == 0:
        return means, covs
    f = np.tile(np.eye(8), (n, 1, 1))
    idx = np.arange(4)
    f[:, idx, idx + 4] = dts[:, None]
    s = np.maximum(means[:, 3], MIN_SCALE)
    q_pos = (POSITION_STD * s) ** 2 * dts
    q_vel = (VELOCITY_STD * s) ** 2 * dts
    q = np.zeros((n, 8, 8))
    q[:, idx, idx] = q_pos[:, None]
    q[:, idx + 4, idx + 4] = q_vel[:, None]
    new_means = np.einsum("nij,nj->ni", f, means)
    new_covs = f @ covs @ f.transpose(0, 2, 1) + q
    return new_means, new_covs


def update(mean: Array, cov: Array, measurement: Array) -> tuple[Array, Array]:
    """One track corrected by its matched box (cx, cy, w, h)."""
    s = max(float(mean[3]), MIN_SCALE)
    r = np.diag(np.full(4, (MEASURE_STD * s) ** 2))
    projected = _H @ cov @ _H.T + r
    gain = np.linalg.solve(projected, _H @ cov).T
    new_mean = mean + gain @ (measurement - _H @ mean)
    new_cov = cov - gain @ projected @ gain.T
    return new_mean, new_cov
