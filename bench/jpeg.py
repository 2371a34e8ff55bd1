"""JPEG benchmark (run by hand, not a test): OpenCV, lensbus's strip encoder/decoder,
simplejpeg and PyTurboJPEG side by side (issue 18, item 4).

On real photos (darknet's dog.jpg, horses.jpg, kite.jpg; ``LENSBUS_PHOTOS`` names another
folder holding them) resized to exactly 640x480 and 1920x1080 (BGR uint8):

* encode at quality 85 (capture's default), 4:2:0 set explicitly for every library:
  ``cv2.imencode``; ``lensbus.images.encode_jpeg`` with 1 thread (capture's model-size copy)
  and 2 threads (capture's ``ENCODE_THREADS`` on 2 cores: a frame of 1 MP or more is encoded
  in 2 strips with a restart marker between them); ``simplejpeg.encode_jpeg``;
  ``TurboJPEG().encode``;
* decode to BGR at full, 1/2 and 1/4 scale (in the DCT domain for all):
  ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_N``; ``lensbus.images.decode_jpeg`` with 1 and
  2 threads (inference's ``DECODE_THREADS``: strips at once, only at reduced scale and only for
  a JPEG with restart markers); ``simplejpeg.decode_jpeg(min_width=, min_height=)``;
  ``TurboJPEG().decode(scaling_factor=(1, N))``.  Every decoder reads the same bytes: once
  as ``cv2.imencode`` writes them (``plain``), once as lensbus's 2-thread strip encoder writes
  them (``strips``, what capture publishes at 1080p; at 640x480 these are the plain bytes).

All cases run interleaved: each round times every (case, candidate) once, in a shuffled
order, so drifting machine load hits all alike.  One timing is the mean over the photos.
Prints markdown tables: median and p90 ms, the time ratio to OpenCV and to lensbus's
pipeline path (2 threads), output KB, and correctness (output shape; mean absolute pixel
difference against the source for encoders, against OpenCV's decode of the same bytes for
decoders).  A candidate that cannot be imported or loaded is skipped and named.  Writes JSON
(machine, versions, every figure) to ``bench/results/jpeg.json``.

Needs ``pip install simplejpeg PyTurboJPEG`` and the system libturbojpeg (Debian:
``libturbojpeg0``).  PyTurboJPEG 2.x needs libjpeg-turbo 3, and Debian 12 ships 2.1.5: there,
``pip install 'PyTurboJPEG<2'``.  Run from a checkout with the repo's environment::

    python bench/jpeg.py                # 100 rounds, ~1.5 min on 2 cores
    python bench/jpeg.py --quick        # 8 rounds, a few seconds
    python bench/jpeg.py --rounds 50 --json /tmp/jpeg.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lensbus.images import decode_jpeg, encode_jpeg

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = Path(os.environ.get("LENSBUS_PHOTOS", "/usr/share/darknet/data"))
PHOTO_NAMES = ("dog.jpg", "horses.jpg", "kite.jpg")
SIZES = [(640, 480), (1920, 1080)]
SCALES = (1, 2, 4)
QUALITY = 85  # CameraConfig.jpeg_quality's default
THREADS = 2  # capture's ENCODE_THREADS and inference's DECODE_THREADS on a 2-core device
RESULTS = ROOT / "bench" / "results" / "jpeg.json"
OPENCV, LENSBUS = "opencv", f"lensbus t{THREADS}"  # the ratios' references

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
Encoder = Callable[[np.ndarray], bytes]
# (bytes, scale, the frame size the message declares): inference knows the size beforehand
Decoder = Callable[[bytes, int, tuple[int, int]], np.ndarray]


# --- the candidates -------------------------------------------------------------------


def cv2_encode(image: np.ndarray) -> bytes:
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        QUALITY,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    ]
    ok, buf = cv2.imencode(".jpg", image, params)
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def cv2_decode(data: bytes, scale: int, size: tuple[int, int] = (0, 0)) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED[scale])
    if image is None:
        raise RuntimeError("cv2.imdecode failed")
    return image


def candidates() -> tuple[dict[str, Encoder], dict[str, Decoder], dict[str, str], dict[str, str]]:
    """Encoders, decoders, versions, and why a candidate was skipped."""
    enc: dict[str, Encoder] = {
        OPENCV: cv2_encode,
        "lensbus t1": lambda im: encode_jpeg(im, QUALITY, 1),
        LENSBUS: lambda im: encode_jpeg(im, QUALITY, THREADS),
    }
    dec: dict[str, Decoder] = {
        OPENCV: cv2_decode,
        "lensbus t1": lambda data, s, size: decode_jpeg(data, s, 1, size=size),
        LENSBUS: lambda data, s, size: decode_jpeg(data, s, THREADS, size=size),
    }
    versions = {"opencv": cv2.__version__, "opencv jpeg": opencv_jpeg()}
    skipped: dict[str, str] = {}
    try:
        import simplejpeg

        enc["simplejpeg"] = lambda im: simplejpeg.encode_jpeg(
            im, QUALITY, colorspace="BGR", colorsubsampling="420"
        )
        # Its scale is the smallest DCT scaling that leaves min_width x min_height (min_factor
        # alone does not scale): here ceil(size / s), inference's own rule (reduction_for).
        dec["simplejpeg"] = lambda data, s, size: simplejpeg.decode_jpeg(
            data, colorspace="BGR", min_width=-(-size[0] // s), min_height=-(-size[1] // s)
        )
        smoke(enc["simplejpeg"], dec["simplejpeg"])
        versions["simplejpeg"] = simplejpeg.__version__
        versions["simplejpeg jpeg"] = linked_turbo("simplejpeg")
    except Exception as exc:  # any failure: skip it, say why
        enc.pop("simplejpeg", None)
        dec.pop("simplejpeg", None)
        skipped["simplejpeg"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()
        bgr, s420 = turbojpeg.TJPF_BGR, turbojpeg.TJSAMP_420  # its default is 4:2:2
        enc["turbojpeg"] = lambda im: tj.encode(im, QUALITY, pixel_format=bgr, jpeg_subsample=s420)
        dec["turbojpeg"] = lambda data, s, size: tj.decode(
            data, pixel_format=bgr, scaling_factor=None if s == 1 else (1, s)
        )
        smoke(enc["turbojpeg"], dec["turbojpeg"])
        versions["PyTurboJPEG"] = getattr(turbojpeg, "__version__", "?")
        versions["PyTurboJPEG jpeg"] = linked_turbo("turbojpeg")
    except Exception as exc:
        enc.pop("turbojpeg", None)
        dec.pop("turbojpeg", None)
        skipped["turbojpeg"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return enc, dec, versions, skipped


def smoke(enc: Encoder, dec: Decoder) -> None:
    """One encode and a 1/2-scale decode of a small image (an API that differs raises)."""
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, 48:] = (0, 128, 255)
    shape = dec(enc(image), 2, (96, 64)).shape
    if shape != (32, 48, 3):
        raise RuntimeError(f"a 96x64 JPEG decoded at 1/2 is {shape}")


def opencv_jpeg() -> str:
    m = re.search(r"^\s*JPEG:\s*(.+)$", cv2.getBuildInformation(), re.MULTILINE)
    return m.group(1).strip() if m else "?"


def linked_turbo(hint: str) -> str:
    """The libjpeg-turbo version compiled into the loaded shared object whose path holds
    ``hint`` (read from /proc/self/maps: Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "?"
    paths = sorted({line.split()[-1] for line in maps.splitlines() if hint in line.lower()})
    for path in paths:
        if not path.startswith("/") or ".so" not in path:
            continue
        m = re.search(rb"libjpeg-turbo version ([0-9.]+)", Path(path).read_bytes())
        if m:
            return f"libjpeg-turbo {m.group(1).decode()} ({Path(path).name})"
    return "?"


# --- inputs and checks ----------------------------------------------------------------


def photos(w: int, h: int) -> list[np.ndarray]:
    out = []
    for name in PHOTO_NAMES:
        image = cv2.imread(str(PHOTOS / name), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(
                f"cannot read {PHOTOS / name} (apt-get install darknet, or set LENSBUS_PHOTOS)"
            )
        shrink = w * h < image.shape[0] * image.shape[1]
        interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        out.append(np.ascontiguousarray(cv2.resize(image, (w, h), interpolation=interp)))
    return out


def jpeg_layout(data: bytes) -> tuple[str, int]:
    """The chroma subsampling (``4:2:0``...) its SOF declares, and its restart interval."""
    i, sampling, restart = 2, "?", 0
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xC3 and data[i + 9] == 3:
            factors = [data[i + 11 + 3 * c] for c in range(3)]
            names = {0x11: "4:4:4", 0x21: "4:2:2", 0x22: "4:2:0", 0x12: "4:4:0"}
            sampling = names.get(factors[0], hex(factors[0])) if factors[1:] == [17, 17] else "?"
        elif marker == 0xDD:
            restart = (data[i + 4] << 8) | data[i + 5]
        elif marker == 0xDA:
            break
        i += 2 + length
    return sampling, restart


def mad(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("nan")
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


# --- timing ---------------------------------------------------------------------------


@dataclass
class Case:
    kind: str  # encode | decode
    size: tuple[int, int]
    name: str  # the candidate
    run: Callable[[], None]  # one call per photo
    source: str = ""  # decode: plain | strips
    scale: int = 1
    times: list[float] = field(default_factory=list)  # s per photo, one per round
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, tuple[int, int], str, int]:
        return (self.kind, self.size, self.source, self.scale)

    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    def p90_ms(self) -> float:
        return float(np.percentile(self.times, 90)) * 1e3


def encode_case(size: tuple[int, int], name: str, fn: Encoder, images: list[np.ndarray]) -> Case:
    outs = [fn(im) for im in images]
    layouts = {jpeg_layout(o) for o in outs}
    decoded = [cv2_decode(o, 1) for o in outs]
    info = {
        "kb": statistics.mean(len(o) for o in outs) / 1024,
        "layout": sorted(layouts),
        "mad_vs_source": max(mad(d, im) for d, im in zip(decoded, images, strict=True)),
    }

    def run() -> None:
        for im in images:
            fn(im)

    return Case("encode", size, name, run, info=info)


def decode_case(
    size: tuple[int, int], source: str, scale: int, name: str, fn: Decoder, blobs: list[bytes]
) -> Case:
    outs = [fn(b, scale, size) for b in blobs]
    refs = [cv2_decode(b, scale) for b in blobs]
    info = {
        "shape": sorted({tuple(o.shape) for o in outs}),
        "shape_ok": all(
            o.shape == r.shape and o.dtype == np.uint8 for o, r in zip(outs, refs, strict=True)
        ),
        "mad_vs_opencv": max(mad(o, r) for o, r in zip(outs, refs, strict=True)),
    }

    def run() -> None:
        for b in blobs:
            fn(b, scale, size)

    return Case("decode", size, name, run, source=source, scale=scale, info=info)


def build_cases(enc: dict[str, Encoder], dec: dict[str, Decoder]) -> tuple[list[Case], dict]:
    cases: list[Case] = []
    notes: dict[str, Any] = {}
    for w, h in SIZES:
        images = photos(w, h)
        for name, fn in enc.items():
            cases.append(encode_case((w, h), name, fn, images))
        plain = [cv2_encode(im) for im in images]
        strips = [encode_jpeg(im, QUALITY, THREADS) for im in images]
        sources = {"plain": plain}
        if strips != plain:
            sources["strips"] = strips
            # The module's claim: the strip bytes decode to the same pixels as plain ones.
            same = max(
                mad(cv2_decode(s, 1), cv2_decode(p, 1)) for s, p in zip(strips, plain, strict=True)
            )
            notes[f"{w}x{h} strips vs plain, OpenCV full decode MAD"] = same
        for source, blobs in sources.items():
            for scale in SCALES:
                for name, fn in dec.items():
                    cases.append(decode_case((w, h), source, scale, name, fn, blobs))
    return cases, notes


def measure(cases: list[Case], rounds: int, warmup: int, seed: int = 18) -> None:
    rng = random.Random(seed)
    order = list(cases)
    gc.collect()
    gc.disable()  # no collector pause inside one case's timing
    try:
        _rounds(order, rng, rounds, warmup)
    finally:
        gc.enable()


def _rounds(order: list[Case], rng: random.Random, rounds: int, warmup: int) -> None:
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for case in order:
            t0 = time.perf_counter()
            case.run()
            dt = (time.perf_counter() - t0) / len(PHOTO_NAMES)
            if r >= warmup:
                case.times.append(dt)


# --- report ---------------------------------------------------------------------------


def ratios(cases: list[Case]) -> None:
    groups: dict[tuple, dict[str, Case]] = {}
    for c in cases:
        groups.setdefault(c.key, {})[c.name] = c
    for group in groups.values():
        for c in group.values():
            c.info["x_opencv"] = c.median_ms() / group[OPENCV].median_ms()
            c.info["x_lensbus"] = c.median_ms() / group[LENSBUS].median_ms()
            fastest = min(group.values(), key=Case.median_ms)
            c.info["fastest"] = c is fastest


def restart_effect(cases: list[Case]) -> dict[str, float]:
    """Per decoder and scale: median time on the strip bytes (restart markers) / on the plain
    bytes of the same photos."""
    plain = {(c.size, c.scale, c.name): c for c in cases if c.source == "plain"}
    out = {}
    for c in cases:
        if c.source == "strips":
            ref = plain[(c.size, c.scale, c.name)]
            out[f"{c.size[0]}x{c.size[1]} 1/{c.scale} {c.name}"] = c.median_ms() / ref.median_ms()
    return out


def fmt(v: float, digits: int = 2) -> str:
    return "nan" if v != v else f"{v:.{digits}f}"


def print_tables(cases: list[Case]) -> None:
    print("## encode, quality 85, 4:2:0 (ms per frame; x = time ratio, < 1 is faster)\n")
    print(
        f"| size | encoder | median ms | p90 ms | x OpenCV | x {LENSBUS} | KB | layout "
        "| MAD vs source |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for c in cases:
        if c.kind != "encode":
            continue
        i = c.info
        star = " *" if i["fastest"] else ""
        layout = ", ".join(f"{s}{f' RST {r}' if r else ''}" for s, r in i["layout"])
        print(
            f"| {c.size[0]}x{c.size[1]} | {c.name}{star} | {fmt(c.median_ms())} | "
            f"{fmt(c.p90_ms())} | {fmt(i['x_opencv'])} | {fmt(i['x_lensbus'])} | "
            f"{i['kb']:.0f} | {layout} | {fmt(i['mad_vs_source'])} |"
        )
    print("\n## decode to BGR (ms per frame; same bytes for every decoder)\n")
    print(
        f"| size | bytes | scale | decoder | median ms | p90 ms | x OpenCV | x {LENSBUS} "
        "| shape | MAD vs OpenCV |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for c in cases:
        if c.kind != "decode":
            continue
        i = c.info
        star = " *" if i["fastest"] else ""
        shape = "x".join(str(d) for d in i["shape"][0]) + ("" if i["shape_ok"] else " WRONG")
        print(
            f"| {c.size[0]}x{c.size[1]} | {c.source} | 1/{c.scale} | {c.name}{star} | "
            f"{fmt(c.median_ms())} | {fmt(c.p90_ms())} | {fmt(i['x_opencv'])} | "
            f"{fmt(i['x_lensbus'])} | {shape} | {fmt(i['mad_vs_opencv'], 3)} |"
        )
    print("\n(* = fastest median in its row group)")
    effect = restart_effect(cases)
    if effect:
        print("\n## restart markers: decode time of the strip bytes / of the plain bytes\n")
        names = list(dict.fromkeys(k.split(" ", 2)[2] for k in effect))
        print("| scale | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for scale in SCALES:
            keys = [k for k in effect if f" 1/{scale} " in k]
            print(f"| 1/{scale} | " + " | ".join(fmt(effect[k]) for k in keys) + " |")


def as_json(
    cases: list[Case], versions: dict, skipped: dict, notes: dict, args: argparse.Namespace
) -> dict[str, Any]:
    def row(c: Case) -> dict[str, Any]:
        info = {k: v for k, v in c.info.items() if k not in ("shape", "layout")}
        extra = (
            {"shape": [list(s) for s in c.info["shape"]]}
            if c.kind == "decode"
            else {"layout": [list(x) for x in c.info["layout"]]}
        )
        return {
            "kind": c.kind,
            "size": f"{c.size[0]}x{c.size[1]}",
            "source": c.source or None,
            "scale": c.scale,
            "candidate": c.name,
            "median_ms": round(c.median_ms(), 4),
            "p90_ms": round(c.p90_ms(), 4),
            "n": len(c.times),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()},
            **extra,
        }

    return {
        "bench": "jpeg",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "versions": versions,
        "skipped": skipped,
        "settings": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "quality": QUALITY,
            "threads": THREADS,
            "photos": [str(PHOTOS / n) for n in PHOTO_NAMES],
        },
        "notes": notes,
        "restart_effect": {k: round(v, 4) for k, v in restart_effect(cases).items()},
        "results": [row(c) for c in cases],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 rounds instead of 100")
    parser.add_argument("--rounds", type=int, help="timed rounds (overrides --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--json", default=str(RESULTS), help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (8 if args.quick else 100)

    enc, dec, versions, skipped = candidates()
    print(
        f"# JPEG bench: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {args.rounds} rounds (+{args.warmup} warm-up), "
        f"photos {', '.join(PHOTO_NAMES)}\n"
    )
    for name, version in versions.items():
        print(f"- {name}: {version}")
    for name, why in skipped.items():
        print(f"- SKIPPED {name}: {why}")
    print()
    cases, notes = build_cases(enc, dec)
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    measure(cases, args.rounds, args.warmup)
    elapsed = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    notes["load average (1 min) before, after"] = load
    ratios(cases)
    print_tables(cases)
    for k, v in notes.items():
        print(f"- {k}: " + ", ".join(fmt(x) for x in (v if isinstance(v, list) else [v])))
    print(f"\n({len(cases)} cases, {elapsed:.0f} s of timing)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(as_json(cases, versions, skipped, notes, args), indent=2) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
