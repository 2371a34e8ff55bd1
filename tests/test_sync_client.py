"""The synchronous SDK (lensbus.SyncClient) on a real nats-server with the generated users:
a real publisher process keeps the results stream and raises events with snapshots; results
go in as the inference user, frames as capture; the SDK reads as the read-only client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.errors import NoServersError
from photos import PHOTOS, photos
from test_natsauth import AuthServer

from lensbus import SyncClient, encode, metrics
from lensbus.bus import connect
from lensbus.clips import avi_bytes, put_clip, read_avi
from lensbus.feeds import NotStored, replay_config
from lensbus.natsauth import authorization_block, generate_passwords
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import Box, ClipInfo, Detection, FrameEnvelope, ModelRef, Result, clip_id
from lensbus.subjects import CLIPS_BUCKET, Subjects

ROOT = Path(__file__).resolve().parent.parent
CAMERA = "yard"
MODEL = ModelRef(name="yolov3-tiny", version="1", framework="onnx", device="cpu")
RULE = {"name": "dog", "labels": ["dog"], "min_score": 0.5, "cooldown_s": 0.0}
S = Subjects()


def result(seq: int, label: str = "person", camera: str = CAMERA) -> Result:
    now = time.time_ns()
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=now - 20_000_000,
        result_ns=now,
        width=768,
        height=576,
        model=MODEL,
        task="detection",
        instance="t",
        detections=[
            Detection(
                label=label,
                class_id=0,
                score=0.9,
                box=Box.from_normalized(0.1, 0.2, 0.5, 0.9, 768, 576),
            )
        ],
    )


class System:
    """The server, the publisher and what was put into the stream before any reader came."""

    def __init__(self, auth: AuthServer, pub: ServiceProcess, jpeg: bytes) -> None:
        self.auth, self.pub, self.jpeg = auth, pub, jpeg
        self.stored: list[Result] = []  # readable results in the stream, in order
        self.seqs: list[int] = []  # their stream sequences

    def client(self, **kw: Any) -> SyncClient:
        return SyncClient(
            self.auth.url, user="client", password=self.auth.passwords["client"], **kw
        )

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    async def _conn(self, user: str) -> Any:
        pw = self.auth.passwords[user]
        return await connect(
            self.auth.url, name=f"t-{user}", reconnect=False, user=user, password=pw
        )

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        """Publish as inference into the stream; the stream sequences JetStream acked."""
        nc = await self._conn("inference")
        try:
            js = nc.jetstream(timeout=5)
            return [(await js.publish(subject, data)).seq for subject, data in items]
        finally:
            await nc.close()

    async def frame(self, seq: int) -> None:
        env = FrameEnvelope(
            camera=CAMERA, seq=seq, capture_ns=time.time_ns(), width=768, height=576, data=self.jpeg
        )
        nc = await self._conn("capture")
        try:
            await nc.publish(S.frames(CAMERA), encode(env))
            await nc.flush()
        finally:
            await nc.close()


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return got


def publisher_has_frame(port: int, seq: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/cameras", timeout=5) as resp:
        cams = {c["id"]: c for c in json.load(resp)["cameras"]}
    frame = (cams.get(CAMERA) or {}).get("frame") or {}
    return frame.get("seq") == seq


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    if not PHOTOS.is_dir():
        pytest.skip("Debian package darknet (real photos) is not installed")
    tmp = tmp_path_factory.mktemp("sync")
    passwords = generate_passwords()
    server = NatsServer(
        tmp / "nats", extra_config=authorization_block(passwords), log_file=tmp / "nats.log"
    ).start()
    auth = AuthServer(server, passwords)
    settings = {
        "nats_url": server.url,
        "metrics_port": free_port(),
        "heartbeat_s": 0.5,
        "rules": json.dumps([RULE]),
        **auth.creds("publisher"),
    }
    # The harness itself (tests/conftest.py's ServiceProc adds only assertions): a `from
    # conftest import` is ambiguous once tests/fuzz and tests/chaos have conftests of their own.
    pub = ServiceProcess("publisher", settings, tmp / "publisher.log", cwd=ROOT)
    pub.start()
    try:
        pub.wait_healthy(30)
        jpeg = (photos(tmp, "dog.jpg") / "dog.jpg").read_bytes()
        sys_ = System(auth, pub, jpeg)
        yield sys_
        assert auth.violations() == [], "the client was refused something"
    finally:
        pub.kill()
        server.stop()


@pytest.fixture(scope="module")
def stored(system: System) -> System:
    """Results in the stream before the reader: three good, one malformed, one with a field
    this version does not know; then a frame and the dog result that fires the rule."""
    good = [result(seq) for seq in (1, 2, 3)]
    future = {**msgpack.unpackb(encode(result(4))), "mood": "curious"}  # a newer producer's
    items = [(S.results(CAMERA), encode(r)) for r in good]
    items += [(S.results(CAMERA), b"\xc1 not msgpack"), (S.results(CAMERA), msgpack.packb(future))]
    seqs = system.run(system.publish(items))
    system.stored = [*good, Result.model_validate(future)]
    system.seqs = [s for i, s in enumerate(seqs) if i != 3]
    system.run(system.frame(5))
    wait_for(lambda: publisher_has_frame(system.pub.port, 5), 20, "the publisher's frame")
    dog = result(5, "dog")
    system.seqs += system.run(system.publish([(S.results(CAMERA), encode(dog))]))
    system.stored.append(dog)
    return system


def rejected(reason: str) -> float:
    return metrics.MESSAGES_REJECTED.labels(reason)._value.get()


def test_replay_from_sequence_time_and_age_skips_the_malformed(stored: System) -> None:
    before = rejected("malformed")
    with stored.client() as c:
        feed = c.results(CAMERA, since=1, follow=False)
        got = list(feed)
        assert [r.seq for r in got] == [r.seq for r in stored.stored]
        assert got == stored.stored  # the unknown field was ignored, the rest read as sent
        assert feed.stream_seq == stored.seqs[-1]
        assert c.rejected == 1 and rejected("malformed") == before + 1
        # The same from a time and from an age; every camera when none is named.
        an_hour = datetime.now() - timedelta(hours=1)
        assert list(c.results(since=an_hour, follow=False)) == stored.stored
        assert list(c.results(CAMERA, since=timedelta(hours=1), follow=False)) == stored.stored
        # Resuming after a stream sequence; a limit stops early.
        rest = list(c.results(CAMERA, since=stored.seqs[1] + 1, follow=False))
        assert rest == stored.stored[2:]
        assert [r.seq for r in c.results(CAMERA, since=1, limit=2)] == [1, 2]
        # Nothing stored for that camera: a replay that ends at once.
        assert list(c.results("nobody", since=1, follow=False)) == []


def test_replay_then_live_and_timeout(stored: System) -> None:
    with stored.client() as c:
        feed = c.results(CAMERA, since=stored.seqs[-1], timeout=10)
        assert next(feed) == stored.stored[-1]
        late = result(99)
        stored.run(stored.publish([(S.results(CAMERA), encode(late))]))
        assert next(feed) == late
        feed.close()
        # Live only: subscribed when results() returns, so nothing published after is lost.
        live = c.results(CAMERA, timeout=10)
        stored.run(stored.publish([(S.results(CAMERA), encode(result(100)))]))
        assert next(live).seq == 100 and live.stream_seq is None
        # A quiet camera: the timeout ends the loop instead of waiting for ever.
        t0 = time.monotonic()
        assert list(c.results("quiet", timeout=0.3)) == []
        assert time.monotonic() - t0 < 5


def test_events_and_their_snapshots(stored: System, tmp_path: Path) -> None:
    with stored.client() as c:
        events = list(
            wait_for(lambda: list(c.events(CAMERA, since=1, follow=False)), 20, "the dog event")
        )
        assert [(e.rule, e.label, e.seq) for e in events] == [("dog", "dog", 5)]
        event = events[0]
        shots = c.snapshots(CAMERA)
        assert [s.name for s in shots] == [event.snapshot]
        assert (shots[0].camera, shots[0].seq, shots[0].size) == (CAMERA, 5, len(stored.jpeg))
        assert c.snapshot(event) == stored.jpeg  # the frame that fired, byte for byte
        out = c.save_snapshot(event.snapshot, tmp_path / "dog.jpg")
        assert out.read_bytes() == stored.jpeg
        assert c.snapshots("elsewhere") == []
        with pytest.raises(NotStored, match="no snapshot"):
            c.snapshot(f"{CAMERA}/1-1.jpg")


def test_clips(stored: System, tmp_path: Path) -> None:
    avi = avi_bytes([stored.jpeg] * 3, 768, 576, 2.0)
    info = ClipInfo(
        id=clip_id("porch", 7, 1_000),
        camera="porch",
        rule="dog",
        event_seq=7,
        event_capture_ns=1_000,
        start_ns=0,
        end_ns=1_000_000_000,
        frames=3,
        fps=2.0,
        width=768,
        height=576,
        pre_s=1.0,
        post_s=1.0,
        ended="complete",
    )

    async def put() -> None:  # as the publisher stores clips: its user, its code
        nc = await stored._conn("publisher")
        try:
            store = await nc.jetstream().object_store(CLIPS_BUCKET)  # the publisher made it
            await put_clip(store, info, avi, 64 * 1024 * 1024)
        finally:
            await nc.close()

    with stored.client() as c:
        assert c.clips("porch") == []
        stored.run(put())
        assert c.clips("porch") == [info]
        assert c.clip(info.id) == avi
        assert c.save_clip(info.id, tmp_path / "c.avi") == 3
        assert len(read_avi((tmp_path / "c.avi").read_bytes()).frames) == 3
        with pytest.raises(NotStored, match="no clip"):
            c.clip("porch-1-1")


def sync_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "lensbus-sync"]


def test_close_ends_feeds_and_leaves_no_thread(stored: System) -> None:
    assert sync_threads() == []
    c = stored.client().connect()
    waiting = c.results(CAMERA, since=1)  # replays, then would wait for ever
    assert next(waiting).seq == 1
    for r in c.results(CAMERA, since=1):  # a loop left by break
        assert r.seq == 1
        break
    assert len(c._feeds) == 1, "the feed left by break was not ended"
    assert sync_threads() == ["lensbus-sync"]
    c.close()
    assert sync_threads() == []
    with pytest.raises(StopIteration):
        next(waiting)
    with pytest.raises(RuntimeError, match="not connected"):
        c.snapshots()


def test_no_stream_and_bad_since_are_clear_errors(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        with SyncClient(server.url) as c, pytest.raises(NotStored, match="does a publisher run"):
            c.results(since=1)
        assert sync_threads() == []
    finally:
        server.stop()
    with pytest.raises(ValueError, match="start at 1"):
        replay_config(0)
    with pytest.raises(TypeError, match="since"):
        replay_config("10m")  # type: ignore[arg-type]


def test_unreachable_nats_fails_fast_without_a_thread() -> None:
    with pytest.raises((NoServersError, OSError, TimeoutError)):
        SyncClient(f"nats://127.0.0.1:{free_port()}", timeout_s=1.0).connect()
    assert sync_threads() == []


SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from lensbus import SyncClient
    url, pw = sys.argv[1], sys.argv[2]
    try:
        with SyncClient(url, user="client", password=pw) as c:
            for r in c.results("ctrlc", since=1):
                print(r.seq, flush=True)
    except KeyboardInterrupt:
        print("threads", sorted(t.name for t in threading.enumerate()), flush=True)
    """
)


def test_ctrl_c_stops_a_script_cleanly(stored: System) -> None:
    stored.run(stored.publish([(S.results("ctrlc"), encode(result(1, camera="ctrlc")))]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    cmd = [sys.executable, "-c", SCRIPT, stored.auth.url, stored.auth.passwords["client"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "1\n"  # replayed; now it waits for live results
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "threads ['MainThread']", out + err
    assert "Traceback" not in err and "Task was destroyed" not in err, err


def test_lensbus_watch_reads_with_the_secrets_file(stored: System, tmp_path: Path) -> None:
    """`lensbus watch --secrets` connects as the read-only client (the file `lensbus up`
    writes), as the other read commands do, and replays what is stored."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"passwords": stored.auth.passwords}))
    cmd = [sys.executable, "-m", "lensbus.cli.main", "watch", CAMERA, "--since", "1h"]
    cmd += ["--no-follow", "--json", "--nats-url", stored.auth.url, "--secrets", str(secrets)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seqs = [json.loads(line)["seq"] for line in done.stdout.splitlines()]
    # What was stored first, in order (other tests of this module add live ones after it).
    assert seqs[: len(stored.stored)] == [r.seq for r in stored.stored], done.stdout


def test_lensbus_clips_reads_with_the_secrets_file(stored: System, tmp_path: Path) -> None:
    """`lensbus clips list --secrets` connects as the read-only client too."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"passwords": stored.auth.passwords}))
    cmd = [sys.executable, "-m", "lensbus.cli.main", "clips", "list", "--json"]
    cmd += ["--nats-url", stored.auth.url, "--secrets", str(secrets)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():  # one clip per line (test_clips above stores some)
        assert ClipInfo.model_validate_json(line).id
