#!/usr/bin/env python3
"""Read a lensbus camera's frames with nothing but NATS, msgpack and the published schema.

This program does not import lensbus: it is written only from ``docs/schemas/frame.json``,
the way a program in another language would be. It shows what a consumer needs to know:

- frames arrive on the subject ``<prefix>.frames.<camera>`` (prefix ``lensbus`` by default);
- each message is a msgpack map; ``v`` is the schema version, and this reader knows ``1``;
- the map's fields are described by ``frame.json`` (a JSON Schema); bytes fields
  (``"format": "binary"``) are msgpack bin, i.e. ``bytes`` once unpacked;
- ``data`` is a JPEG of ``width`` x ``height`` pixels;
- a camera with a model stream sends every frame only while a reader says it is there: an
  empty message on ``<prefix>.want.frames.<camera>`` at least every few seconds (it holds
  10 s; ``docs/schemas/frames_wanted.json``), else about one frame a second.

It prints one JSON line per frame and exits after ``--count`` frames::

    python docs/examples/raw_subscriber.py nats://127.0.0.1:4222 cam1 --count 10

Needs ``pip install nats-py msgpack`` and, to decode the JPEG, ``opencv-python-headless``
(without OpenCV it still checks and prints the frames, with ``"shape": null``).
Exit status: 0 after ``--count`` frames, 1 on timeout, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgpack
import nats

try:  # optional: decoding the JPEG
    import cv2
    import numpy as np
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_CV2 = False
else:
    HAVE_CV2 = True

SCHEMA_VERSION = 1
DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "frame.json"


def _type_ok(value: Any, spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    if kind is None:
        return True
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if k == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k == "number" and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if k == "string":
            # Binary strings travel as msgpack bin (bytes); other strings as msgpack str.
            if spec.get("format") == "binary" and isinstance(value, bytes):
                return True
            if spec.get("format") != "binary" and isinstance(value, str):
                return True
        if k == "boolean" and isinstance(value, bool):
            return True
        if k == "null" and value is None:
            return True
        if k == "array" and isinstance(value, list):
            return True
        if k == "object" and isinstance(value, dict):
            return True
    return False


def check_value(value: Any, spec: dict[str, Any], defs: dict[str, Any], where: str) -> list[str]:
    """The problems of one value against a (small subset of) JSON Schema."""
    if "$ref" in spec:
        spec = defs[spec["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in spec:
        if any(not check_value(value, s, defs, where) for s in spec["anyOf"]):
            return []
        return [f"{where}: {value!r:.40} matches none of the allowed types"]
    if not _type_ok(value, spec):
        want = spec.get("type")
        if spec.get("format"):
            want = f"{want} ({spec['format']})"
        return [f"{where}: expected {want}, got {type(value).__name__}"]
    problems = []
    if "const" in spec and value != spec["const"]:
        problems.append(f"{where}: must be {spec['const']!r}, got {value!r:.40}")
    if "enum" in spec and value not in spec["enum"]:
        problems.append(f"{where}: must be one of {spec['enum']}, got {value!r:.40}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in spec and value < spec["minimum"]:
            problems.append(f"{where}: {value} < minimum {spec['minimum']}")
        if "maximum" in spec and value > spec["maximum"]:
            problems.append(f"{where}: {value} > maximum {spec['maximum']}")
        if "exclusiveMinimum" in spec and value <= spec["exclusiveMinimum"]:
            problems.append(f"{where}: {value} <= exclusive minimum {spec['exclusiveMinimum']}")
        if "exclusiveMaximum" in spec and value >= spec["exclusiveMaximum"]:
            problems.append(f"{where}: {value} >= exclusive maximum {spec['exclusiveMaximum']}")
    if isinstance(value, str) and "pattern" in spec:
        # JSON Schema's '$' is the end of the text; Python's also matches before a final '\n'.
        pattern = re.sub(r"(?<!\\)\$$", r"\\Z", spec["pattern"])
        if not re.search(pattern, value):
            problems.append(f"{where}: {value!r:.40} does not match {spec['pattern']}")
    return problems


def check_frame(msg: Any, schema: dict[str, Any]) -> list[str]:
    """The problems of an unpacked frame message; empty when it is a good v1 frame."""
    if not isinstance(msg, dict):
        return [f"expected a msgpack map, got {type(msg).__name__}"]
    if msg.get("v") != SCHEMA_VERSION:
        return [f"schema version v={msg.get('v')!r}, this reader knows v={SCHEMA_VERSION}"]
    props: dict[str, Any] = schema.get("properties", {})
    defs: dict[str, Any] = schema.get("$defs", {})
    problems = [
        f"{key}: required field missing" for key in schema.get("required", []) if key not in msg
    ]
    for key, value in msg.items():
        if key not in props:
            if schema.get("additionalProperties") is False:
                problems.append(f"{key!r}: not a field of {schema.get('title', 'the schema')}")
            continue
        problems += check_value(value, props[key], defs, str(key))
    return problems


def decode_jpeg(data: bytes) -> tuple[int, ...] | None:
    if not HAVE_CV2:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("data is not a decodable JPEG")
    return tuple(int(n) for n in image.shape)


async def run(args: argparse.Namespace, schema: dict[str, Any]) -> int:
    subject = f"{args.prefix}.frames.{args.camera}"
    want = f"{args.prefix}.want.frames.{args.camera}"  # "send me every frame"
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        queue.put_nowait(msg.data)

    nc = await nats.connect(args.url, max_reconnect_attempts=3)
    try:
        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        print(f"listening on {subject}", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        printed = rejected = 0
        wanted_at = -1e9
        while printed < args.count:
            if loop.time() - wanted_at > 3:  # the want holds 10 s: say it again in time
                await nc.publish(want, b"")
                wanted_at = loop.time()
            try:
                data = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                print(
                    f"timeout: {printed} of {args.count} frames in {args.timeout:.0f}s",
                    file=sys.stderr,
                )
                return 1
            try:
                msg = msgpack.unpackb(data, raw=False)
                problems = check_frame(msg, schema)
                shape = None if problems else decode_jpeg(msg["data"])
            except Exception as exc:  # not msgpack, or a bad JPEG: skip it, keep going
                problems = [f"{type(exc).__name__}: {exc}"]
            if problems:
                rejected += 1
                print(f"rejected a message: {'; '.join(problems)}", file=sys.stderr, flush=True)
                continue
            line = {
                "camera": msg["camera"],
                "seq": msg["seq"],
                "capture_ns": msg["capture_ns"],
                "width": msg["width"],
                "height": msg["height"],
                "shape": list(shape) if shape is not None else None,
            }
            print(json.dumps(line), flush=True)
            printed += 1
        return 0
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="NATS server URL, e.g. nats://127.0.0.1:4222")
    parser.add_argument("camera", help="camera id")
    parser.add_argument("--count", type=int, default=10, help="frames to print, then exit")
    parser.add_argument("--prefix", default="lensbus", help="subject prefix (default lensbus)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait in all")
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="path to frame.json")
    args = parser.parse_args(argv)
    schema = json.loads(Path(args.schema).read_text())
    try:
        return asyncio.run(run(args, schema))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
