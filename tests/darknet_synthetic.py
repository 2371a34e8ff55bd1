"""A synthetic darknet net and its random weights (no MXNet needed to make them).

Shared by the importer's tests (``test_darknet_import``, which need MXNet) and the command
line's (``test_models_cli``, some of which do not).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.packaging.darknet_cfg import parse_cfg  # noqa: E402

# Exercises what yolov3-tiny does not: shortcut, a route with a positive index and two
# inputs, a stride-2 pool on an odd size, SPP-style stride-1 pools, a non-square input.
SYNTHETIC_CFG = """
[net]
# non-square on purpose; 72 -> 36 -> 18 -> 9 gives odd sizes further down
width=96
height=72
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=1
stride=1
pad=1
activation=leaky

[shortcut]
from=-2
activation=linear

; 18x24 -> 9x12 (odd height)
[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

; 5x6 -> 3x3: darknet rounds odd sizes up
[maxpool]
size=2
stride=2

[maxpool]
size=5
stride=1

[route]
layers=-1,7

[maxpool]
size=2
stride=1

[convolutional]
size=1
stride=1
pad=1
filters=24
activation=linear

[yolo]
mask=2,3
anchors=10,14, 23,27, 37,58, 81,82
classes=7
num=4

[route]
layers = 6

[upsample]
stride=2

[convolutional]
size=1
stride=1
pad=1
filters=24
activation=linear

[yolo]
mask=0,1
anchors=10,14, 23,27, 37,58, 81,82
classes=7
num=4
"""


def _write_random_weights(cfg: Path, path: Path, extra: int = 0) -> None:
    """A plausible random darknet weights file for ``cfg`` (positive BN variances)."""
    rng = np.random.default_rng(0)
    sections = parse_cfg(cfg)
    channels = [int(sections[0]["channels"])]
    chunks = []
    for sec in sections[1:]:
        prev = channels[-1]
        if sec["type"] == "convolutional":
            n, k = int(sec["filters"]), int(sec["size"])
            if sec.get("batch_normalize") == "1":
                chunks += [rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)]
                chunks += [rng.normal(0, 0.1, n), rng.uniform(0.5, 2.0, n)]
            else:
                chunks.append(rng.normal(0, 0.5, n))
            chunks.append(rng.normal(0, 1 / np.sqrt(prev * k * k), n * prev * k * k))
            prev = n
        elif sec["type"] == "route":
            idx = [int(v) for v in sec["layers"].split(",")]
            here = len(channels) - 1
            prev = sum(channels[1 + (here + i if i < 0 else i)] for i in idx)
        channels.append(prev)
    chunks.append(rng.normal(size=extra))
    with path.open("wb") as f:
        np.array([0, 2, 5], dtype="<i4").tofile(f)
        np.array([1234], dtype="<i8").tofile(f)
        np.concatenate(chunks).astype("<f4").tofile(f)
