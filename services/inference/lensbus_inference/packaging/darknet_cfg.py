"""Darknet's files: the ``.cfg`` (sections of options) and the ``.weights`` (a header, then
every layer's floats in one flat array).  Plain Python and numpy: reading a cfg needs no MXNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

Section = dict[str, str]
FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# cfg parsing
# --------------------------------------------------------------------------------------------


def parse_cfg(path: str | Path) -> list[Section]:
    """Parse a darknet cfg into a list of sections, in file order.

    Each section is a dict of the raw string options plus ``"type"`` holding the section name
    (``"net"``, ``"convolutional"``, ...).  Like darknet, whitespace anywhere in a line is
    ignored (``saturation = 1.5`` is ``saturation=1.5``) and lines starting with ``#`` or ``;``
    are comments; unlike darknet, a trailing ``# comment`` after an option is tolerated too.
    """
    path = Path(path)
    sections: list[Section] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = re.sub(r"\s+", "", raw.split("#", 1)[0])
        if not line or line.startswith(";"):
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ValueError(f"{path}:{lineno}: malformed section header {raw!r}")
            sections.append({"type": line[1:-1].lower()})
            continue
        if not sections:
            raise ValueError(f"{path}:{lineno}: option {raw!r} before the first [section]")
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ValueError(f"{path}:{lineno}: expected key=value, got {raw!r}")
        # darknet's option_find returns the first match, so a repeated key keeps its first value
        sections[-1].setdefault(key, value)
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise ValueError(f"{path}: a darknet cfg must start with a [net] section")
    return sections


def int_option(section: Section, key: str, default: int | None = None) -> int:
    if key in section:
        return int(section[key])
    if default is None:
        raise ValueError(f"[{section['type']}] is missing required option {key!r}")
    return default


def float_option(section: Section, key: str, default: float) -> float:
    return float(section[key]) if key in section else default


def int_list(section: Section, key: str) -> list[int]:
    return [int(v) for v in section[key].split(",") if v]


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
    # Same test as darknet's load_weights_upto (the <1000 guard rejects byte-swapped files).
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        seen, offset = int(np.frombuffer(data, dtype="<i8", count=1, offset=12)[0]), 20
    else:
        seen, offset = int(np.frombuffer(data, dtype="<i4", count=1, offset=12)[0]), 16
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
