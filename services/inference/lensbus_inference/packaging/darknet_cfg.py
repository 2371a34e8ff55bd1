"""Darknet's files: the ``.cfg`` (sections of options) and the ``.weights`` (a header, then
every layer's floats in one flat array).  Plain Python and numpy: reading a cfg needs no MXNet.

The cfg reader and the weights' size rules live in :mod:`lensbus.darknet` (shared, so the
OpenCV backend checks a ``.weights`` file by the same rules before loading it); they are
re-exported here for the importer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from lensbus.darknet import (
    Section,
    float_option,
    header_size,
    int_list,
    int_option,
    parse_cfg,
    weight_count,
)

__all__ = [
    "FloatArray",
    "Section",
    "WeightsHeader",
    "float_option",
    "int_list",
    "int_option",
    "parse_cfg",
    "read_weights",
    "weight_count",
]

FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# weights file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsHeader:
    major: int
    minor: int
    revision: int
    seen: int  # images seen during training; informational only


def read_weights(
    path: str | Path, expected_count: int | None = None
) -> tuple[WeightsHeader, FloatArray]:
    """Read a darknet ``.weights`` file: header, then one flat float32 array.

    The header is three int32 (major, minor, revision) and ``seen``, which darknet writes as
    int64 from format 0.2 on and as int32 before.  If ``expected_count`` is given the number of
    floats must match it exactly: a mismatch means the weights belong to another cfg, and
    loading them anyway would produce a network that runs but outputs garbage.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"{path}: too short ({len(data)} bytes) to be a darknet weights file")
    major, minor, revision = (int(v) for v in np.frombuffer(data, dtype="<i4", count=3))
    offset = header_size(data)
    seen_type = "<i8" if offset == 20 else "<i4"
    seen = int(np.frombuffer(data, dtype=seen_type, count=1, offset=12)[0])
    body = len(data) - offset
    if body % 4:
        raise ValueError(f"{path}: weights payload of {body} bytes is not a whole number of floats")
    weights = np.frombuffer(data, dtype="<f4", offset=offset)
    if expected_count is not None and weights.size != expected_count:
        raise ValueError(
            f"{path}: holds {weights.size} weights but the cfg needs {expected_count} "
            f"({'too few' if weights.size < expected_count else 'too many'}); "
            "the weights do not belong to this cfg"
        )
    return WeightsHeader(major, minor, revision, seen), weights
