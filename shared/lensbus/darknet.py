"""Darknet's files without darknet: the ``.cfg`` (sections of options) and the size a
``.weights`` file must have for it.  Plain Python: the OpenCV backend checks a package's
weights with it before ``cv2.dnn.readNetFromDarknet`` (which loads a short file and serves
garbage), and inference's darknet importer reads cfgs with it.
"""

from __future__ import annotations

import re
from pathlib import Path

Section = dict[str, str]


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


def header_size(head: bytes) -> int:
    """Bytes of a weights file's header, from its first 12: three int32 (major, minor,
    revision), then ``seen``, int64 from format 0.2 on and int32 before."""
    major, minor = (int.from_bytes(head[i : i + 4], "little", signed=True) for i in (0, 4))
    # Same test as darknet's load_weights_upto (the <1000 guard rejects byte-swapped files).
    return 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16


# Layers that keep their input's channels and hold no weights.
_PASS_THROUGH = frozenset(
    {"maxpool", "max", "upsample", "yolo", "region", "dropout", "avgpool", "avg", "softmax"}
)


def _route_channels(sec: Section, index: int, channels: list[int]) -> int:
    total = 0
    for ref in int_list(sec, "layers"):
        src = index + ref if ref < 0 else ref
        if not 0 <= src < index:
            raise ValueError(
                f"[route] (layer {index}) refers to layer {ref}, which is not before it"
            )
        total += channels[src]
    return total // int_option(sec, "groups", 1)


def weight_count(sections: list[Section]) -> int | None:
    """The floats a ``.weights`` file holds after its header for this cfg, or ``None`` when
    the cfg has a layer this does not size (e.g. ``[connected]``, whose count needs spatial
    sizes).  Convolutions hold their kernel and, per filter, a bias or batch norm's
    beta, gamma, mean and variance; the other layers sized here hold nothing."""
    channels: list[int] = []
    prev = int_option(sections[0], "channels", 3)
    total = 0
    for i, sec in enumerate(sections[1:]):
        kind = sec["type"]
        if kind in ("convolutional", "conv"):
            filters, size = int_option(sec, "filters", 1), int_option(sec, "size", 1)
            kernel = filters * (prev // int_option(sec, "groups", 1)) * size * size
            total += kernel + filters * (4 if int_option(sec, "batch_normalize", 0) else 1)
            prev = filters
        elif kind == "route":
            prev = _route_channels(sec, i, channels)
        elif kind == "reorg":
            prev *= int_option(sec, "stride", 1) ** 2
        elif kind not in _PASS_THROUGH and kind != "shortcut":
            return None
        channels.append(prev)
    return total


def weights_size_problem(cfg: Path, weights: Path) -> str | None:
    """Why ``weights`` cannot be this cfg's weights (its size is not header + the cfg's
    floats), or ``None`` when it fits or the cfg cannot be sized (see :func:`weight_count`).

    Trailing bytes are refused like missing ones: darknet would ignore them, but a file
    longer than its cfg needs is most likely another (larger) network's weights, whose prefix
    would load and serve garbage.
    """
    count = weight_count(parse_cfg(cfg))
    if count is None:
        return None
    actual = weights.stat().st_size
    with weights.open("rb") as f:
        head = f.read(12)
    if len(head) < 12:
        return f"{weights.name}: {actual} bytes, too short to be a darknet weights file"
    expected = header_size(head) + 4 * count
    if actual == expected:
        return None
    how = "truncated" if actual < expected else "longer than its cfg needs"
    return (
        f"{weights.name}: {actual} bytes, but {cfg.name} needs {expected} "
        f"({count} weights after a {expected - 4 * count}-byte header): {how}"
    )
