"""What the fuzz tests and ``bench/fuzz.py`` look at in a service under fire: its process
(alive, RSS from /proc), its ``/healthz``, its rejects by reason; and the oracle that says,
in this process, what a message should come to."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

from lensbus.codec import decode
from lensbus.errors import DecodeError, ImageError
from lensbus.images import MAX_PIXELS, check_jpeg
from lensbus.processes import ServiceProcess
from lensbus.schemas import FrameEnvelope, Message

REJECTED = "lensbus_messages_rejected_total"
# Rejects that are the input's fault. A `model_error` for any of these inputs would mean a
# bad message got as far as the model.
INPUT_REASONS = {
    "malformed",
    "invalid",
    "unknown_version",
    "too_large",
    "corrupt_image",
    "image_too_large",
    "size_mismatch",
    "camera_mismatch",
    "subject_mismatch",
    "no_reply_subject",
}

# One example is one batch sent to a real process (seconds, not microseconds), and the
# process is shared by every batch of a test on purpose: a leak or a drifting counter shows
# across batches.  CI runs a few batches per test; LENSBUS_FUZZ_EXAMPLES raises it by hand.
FUZZ = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
    # Shrinking re-sends batch after batch to a process that may be wedged: minutes of CI
    # for a smaller repro.  The failing batch is printed whole instead (print_blob replays it).
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def fuzz_settings(examples: int | None = None) -> settings:
    n = examples or int(os.environ.get("LENSBUS_FUZZ_EXAMPLES", "0") or 0)
    return settings(FUZZ, max_examples=n) if n else FUZZ


@dataclass
class Memory:
    rss_mb: float
    hwm_mb: float


def memory(pid: int) -> Memory:
    """VmRSS and VmHWM (peak) of a live process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return Memory(values["VmRSS"], values["VmHWM"])


def samples(sp: ServiceProcess, timeout: float = 20.0) -> dict[str, float]:
    """Every sample on /metrics; a busy machine may miss one 3 s answer, so it asks again."""
    deadline = time.monotonic() + timeout
    while not (got := sp.metrics()):
        assert sp.returncode is None, f"{sp.name} died:\n{sp.log_tail(30)}"
        assert time.monotonic() < deadline, f"{sp.name} /metrics does not answer"
    return got


def rejects(sp: ServiceProcess) -> dict[str, float]:
    """``lensbus_messages_rejected_total`` by reason."""
    out = {}
    for key, value in samples(sp).items():
        if key.startswith(REJECTED + "{"):
            out[key.split('reason="', 1)[1].split('"', 1)[0]] = value
    return out


def metric_sum(sp: ServiceProcess, name: str) -> float:
    """The sum of a counter over all its labels."""
    return sum(v for k, v in samples(sp).items() if k == name or k.startswith(name + "{"))


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def assert_serving(sp: ServiceProcess) -> None:
    """Alive, and /healthz 200."""
    assert sp.returncode is None, f"{sp.name} died ({sp.returncode}):\n{sp.log_tail(30)}"
    code, body = sp.http("/healthz", 10.0)
    assert code == 200, f"{sp.name} /healthz {code}: {body}"


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# ---- the oracle ---------------------------------------------------------------------------


def expected_reason(data: bytes, schema: type[Message]) -> str | None:
    """The reason the codec refuses ``data`` for, None when it reads."""
    try:
        decode(data, schema)
    except DecodeError as exc:
        return exc.reason
    return None


@dataclass
class FrameVerdict:
    """What a frame message should come to: ``reason`` when it must be refused, None when it
    passes every check made before decoding (then a result, or `corrupt_image`/`size_mismatch`
    for a JPEG whose damage only the decoder sees)."""

    reason: str | None
    camera: str = ""


def frame_verdict(data: bytes, max_bytes: int, max_pixels: int = MAX_PIXELS) -> FrameVerdict:
    if len(data) > max_bytes:
        return FrameVerdict("too_large")
    try:
        env = decode(data, FrameEnvelope)
    except DecodeError as exc:
        return FrameVerdict(exc.reason)
    try:
        check_jpeg(env.data, size=(env.width, env.height), max_pixels=max_pixels)
    except ImageError as exc:
        return FrameVerdict(exc.reason, env.camera)
    return FrameVerdict(None, env.camera)


@dataclass
class Tally:
    """Counts of a run: messages sent and what the oracle expects of them."""

    sent: int = 0
    must_reject: dict[str, int] = field(default_factory=dict)
    may_pass: int = 0

    def add(self, reason: str | None) -> None:
        self.sent += 1
        if reason is None:
            self.may_pass += 1
        else:
            self.must_reject[reason] = self.must_reject.get(reason, 0) + 1

    @property
    def rejected(self) -> int:
        return sum(self.must_reject.values())


async def publish_all(url: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish every (subject, payload) on one connection and flush."""
    import nats as nats_py

    nc = await nats_py.connect(url)
    try:
        for subject, payload in messages:
            await nc.publish(subject, payload)
        await nc.flush()
    finally:
        await nc.close()


def check_rejects(got: dict[str, float], tally: Tally, passed: float, loose: set[str]) -> None:
    """Every message the oracle refuses is counted under its reason; the rest passed or were
    refused for a reason in ``loose`` (damage only the decoder sees); nothing is `model_error`
    and every message is accounted for."""
    assert "model_error" not in got, f"input counted as model_error: {got}"
    assert set(got) <= INPUT_REASONS, f"unexpected reasons {got}"
    for reason, n in tally.must_reject.items():
        assert got.get(reason, 0) >= n, f"{reason}: {got.get(reason, 0)} counted, {n} sent"
    extra = {r: n - tally.must_reject.get(r, 0) for r, n in got.items()}
    assert all(n == 0 or r in loose for r, n in extra.items()), f"extra rejects {extra}"
    assert sum(got.values()) + passed == tally.sent, (got, passed, tally)
