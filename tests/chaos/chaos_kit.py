"""What every chaos test needs: the real pipeline (nats-server, publisher, inference, capture
on real photos and the real YOLOv3-tiny ONNX package), a witness of the results as NATS
routed them, the results stream as JetStream stored them, and timing of recoveries.

"Stored results lost" is measured two ways: every result the witness saw (the server routed
it, so the stream should hold it) must be in ``LENSBUS_RESULTS`` afterwards, and every
stream sequence number below the last one must still be readable (no hole after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats as nats_py
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.subjects import RESULTS_STREAM

ROOT = Path(__file__).resolve().parents[2]
CAMERA = "chaoscam"
YOLO = "yolov3-tiny-onnx"
FPS = 4  # a rate the model keeps up with on a busy 2-core machine
# Debian's libfaketime, wherever the machine's multiarch folder is (x86_64, aarch64...).
FAKETIME_LIB = next(
    iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))),
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
)

# Every figure a test measured, printed at the end of the session (run with -s).
FIGURES: dict[str, dict[str, object]] = {}


def record(fault: str, **figures: object) -> None:
    FIGURES[fault] = figures
    print(f"\nCHAOS {fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def until(cond: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``cond`` (sync or async) until true; the seconds it took."""
    start = time.monotonic()
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


class Services:
    """Service processes with extra environment (faketime), all killed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: list[ServiceProcess] = []

    def start(
        self, name: str, nats_url: str, env: dict[str, str] | None = None, **settings: object
    ) -> ServiceProcess:
        values: dict[str, object] = {
            "metrics_port": free_port(),
            "heartbeat_s": 0.5,
            "nats_url": nats_url,
            **settings,
        }
        sp = ServiceProcess(name, values, self.tmp / f"{name}-{len(self.procs)}.log", cwd=ROOT)
        sp.env.update(env or {})
        self.procs.append(sp)
        sp.start()
        return sp

    def close(self) -> None:
        for sp in self.procs:
            sp.kill()


def healthy(sp: ServiceProcess) -> None:
    assert sp.wait_healthy(60), sp.log_tail(30)


@dataclass
class Witness:
    """Every result message NATS routed on the camera's subject (a digest of its bytes),
    with the monotonic time it came."""

    seen: list[tuple[float, bytes]] = field(default_factory=list)
    nc: nats_py.NATS | None = None

    async def start(self, url: str, camera: str = CAMERA) -> Witness:
        async def on_result(msg: Msg) -> None:
            self.seen.append((time.monotonic(), digest(msg.data)))

        self.nc = await nats_py.connect(
            url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="chaos-witness"
        )
        await self.nc.subscribe(f"lensbus.results.{camera}", cb=on_result)
        return self

    def since(self, t: float) -> int:
        return sum(1 for when, _ in self.seen if when >= t)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class StreamState:
    first: int
    last: int
    digests: dict[int, bytes]  # stream seq -> digest of the payload (results of CAMERA)
    holes: list[int]  # seqs between first and last that cannot be read


class Stream:
    """The results stream as stored, read over its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: nats_py.NATS | None = None

    async def connect(self) -> Stream:
        self.nc = await nats_py.connect(
            self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="chaos-stream"
        )
        return self

    async def last_seq(self) -> int:
        assert self.nc is not None
        try:
            info = await self.nc.jetstream(timeout=2).stream_info(RESULTS_STREAM)
        except Exception:  # not there yet, or NATS away: nothing stored that we can see
            return 0
        return int(info.state.last_seq or 0)

    async def read(self) -> StreamState:
        assert self.nc is not None
        js = self.nc.jetstream(timeout=5)
        info = await js.stream_info(RESULTS_STREAM)
        first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
        digests: dict[int, bytes] = {}
        holes: list[int] = []
        for seq in range(max(first, 1), last + 1):
            try:
                msg = await js.get_msg(RESULTS_STREAM, seq)
            except NotFoundError:
                holes.append(seq)
                continue
            if msg.subject == f"lensbus.results.{CAMERA}" and msg.data is not None:
                digests[seq] = digest(msg.data)
        return StreamState(first, last, digests, holes)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@dataclass
class Pipeline:
    """nats-server, publisher, inference and capture on one camera, and what watches them."""

    server: NatsServer
    services: Services
    witness: Witness
    stream: Stream
    model: Path
    photos: Path
    tmp: Path
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(
        self, name: str, env: dict[str, str] | None = None, **extra: object
    ) -> ServiceProcess:
        settings: dict[str, dict[str, object]] = {
            "publisher": {},
            "inference": {
                "model": self.model,
                "cameras": CAMERA,
                "instance": "chaos-inf",
                "model_cache": self.tmp / "cache",
            },
            "capture": {"camera": CAMERA, "source": self.photos, "loop": True, "fps": FPS},
        }
        values = {**settings[name], **extra}
        sp = self.services.start(name, self.server.url, env=env, **values)
        self.procs[name] = sp
        return sp

    def restart(self, name: str) -> ServiceProcess:
        sp = self.procs[name]
        sp.start()
        return sp

    def all_healthy(self) -> bool:
        return all(sp.healthy() for sp in self.procs.values())

    async def stored_grows(self, timeout: float, what: str) -> float:
        """Seconds until the stream holds a result newer than now."""
        base = await self.stream.last_seq()

        async def grew() -> bool:
            return await self.stream.last_seq() > base

        return await until(grew, timeout, what)

    async def lost(self, before: StreamState | None = None) -> tuple[int, int, StreamState]:
        """(results the witness saw that the stream lacks, stored results that vanished
        since ``before``), and the stream now."""
        now = await self.stream.read()
        stored = set(now.digests.values())
        unstored = sum(1 for _, d in self.witness.seen if d not in stored)
        vanished = 0
        if before is not None:
            vanished = sum(1 for s, d in before.digests.items() if now.digests.get(s) != d)
        return unstored, vanished + len(now.holes), now


@contextlib.asynccontextmanager
async def running_pipeline(
    server: NatsServer,
    services: Services,
    model: Path,
    photos: Path,
    tmp: Path,
    **publisher: object,
) -> AsyncIterator[Pipeline]:
    """Publisher (it keeps the results stream), inference and capture on ``server``, up to
    the first stored result; everything stopped at the end, the server killed."""
    witness = await Witness().start(server.url)
    stream = await Stream(server.url).connect()
    p = Pipeline(server, services, witness, stream, model, photos, tmp)
    try:
        p.start("publisher", None, **publisher)
        for name in ("inference", "capture"):
            p.start(name)
        for sp in p.procs.values():
            healthy(sp)
        await p.stored_grows(60, "the first stored result")
        yield p
    finally:
        await witness.close()
        await stream.close()
        services.close()
        server.kill()


class SmallStoreServer(NatsServer):
    """A nats-server whose JetStream may use only ``max_file_store`` bytes of disk: a full
    disk for the store, without root or a tmpfs."""

    def __init__(self, store_dir: Path, max_file_store: int, **kwargs: Any) -> None:
        super().__init__(store_dir, **kwargs)
        self.max_file_store = max_file_store

    def write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'listen: "{self.host}:{self.port}"\n'
            f"max_payload: {self.max_payload}\n"
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n'
            f"  max_file_store: {self.max_file_store}\n}}\n"
        )
        return self.config_path


def faketime_env(stamp_file: Path) -> dict[str, str]:
    """libfaketime reading its offset from ``stamp_file`` on every call (no cache): a clock
    that jumps when the file is rewritten. Monotonic clocks stay real
    (FAKETIME_DONT_FAKE_MONOTONIC), as a wall clock set by NTP or by hand behaves."""
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME_TIMESTAMP_FILE": str(stamp_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "DONT_FAKE_MONOTONIC": "1",  # its name before libfaketime 0.9.8
    }
