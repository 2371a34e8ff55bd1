"""Storing a clip of N JPEGs in JetStream: one object in an object store (what the publisher
does) vs N messages in a stream with limits. Run by hand: ``python bench/clips.py``."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.js import api

from lensbus.clips import avi_bytes
from lensbus.natsserver import NatsServer

FRAMES, JPEG_BYTES, ROUNDS = 100, 60_000, 10  # 10 s at 10 fps of ~720p JPEGs


async def main(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    store = await js.create_object_store("bench-clips")
    await js.add_stream(api.StreamConfig(name="BENCH", subjects=["bench.clips.>"]))
    jpegs = [bytes([i % 256]) * JPEG_BYTES for i in range(FRAMES)]
    obj, msgs = [], []
    for r in range(ROUNDS):
        t0 = time.perf_counter()
        data = avi_bytes(jpegs, 1280, 720, 10.0)
        await store.put(f"clip-{r}", data)
        obj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i, j in enumerate(jpegs):
            await js.publish(f"bench.clips.c{r}", j, headers={"Seq": str(i)})
        msgs.append(time.perf_counter() - t0)
    mb = FRAMES * JPEG_BYTES / 1e6
    print(f"clip of {FRAMES} JPEGs, {mb:.1f} MB, median of {ROUNDS}:")
    print(f"  one object (AVI built + put):  {statistics.median(obj) * 1e3:.0f} ms")
    print(f"  {FRAMES} stream messages:         {statistics.median(msgs) * 1e3:.0f} ms")
    await nc.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        server = NatsServer(Path(d)).start()
        try:
            asyncio.run(main(server.url))
        finally:
            server.stop()
