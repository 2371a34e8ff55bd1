"""Fuzz bench (run by hand, not a test): the fuzz suite's payloads (``tests/fuzz``) in the
tens of thousands, against real processes on a real nats-server.

For each target, hypothesis draws batches of hostile messages (the same strategies and the
same per-batch checks as the tests: every message accounted for, rejects by reason, none as
`model_error`, /healthz 200), then a correct-after check. Printed per target: messages,
messages/s (publish to all accounted for, median batch rate and overall), rejects by reason,
RSS before/after/peak (VmRSS, VmHWM), and the correct-after check.

    python bench/fuzz.py                       # 20,000 messages per target
    python bench/fuzz.py --messages 2000       # quicker
    python bench/fuzz.py --only inference      # inference, publisher, deployer
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fuzz")]

from fuzz_probe import memory, rejects  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lensbus import Subjects  # noqa: E402
from lensbus.modelpkg import pack  # noqa: E402
from lensbus.natsserver import NatsServer, free_port  # noqa: E402
from lensbus.processes import ServiceProcess  # noqa: E402

BATCH = 200


def run_batches(
    strategy: st.SearchStrategy[Any],
    messages: int,
    fire: Callable[[Any], Coroutine[Any, Any, None]],
    size: Callable[[Any], int],
) -> tuple[int, float, list[float]]:
    """Draw batches until ``messages`` were sent; (sent, seconds in fire, batch rates)."""
    sent, busy, rates = 0, 0.0, []
    examples = max(1, -(-messages // BATCH))  # batches of up to BATCH: a rerun tops it up

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(batch: Any) -> None:
        nonlocal sent, busy
        t0 = time.perf_counter()
        asyncio.run(fire(batch))
        dt = time.perf_counter() - t0
        n = size(batch)
        sent, busy = sent + n, busy + dt
        rates.append(n / dt)

    while sent < messages:
        one()
    print(f"  ({len(rates)} batches)", flush=True)
    return sent, busy, rates


def report(name: str, sp: ServiceProcess, before: Any, run: tuple[int, float, list[float]]) -> None:
    sent, busy, rates = run
    after = memory(sp.pid)
    sys.stdout.flush()
    print(f"\n## {name}\n")
    print(
        f"- messages: {sent} in {busy:.1f} s: {sent / busy:.0f}/s overall, "
        f"{statistics.median(rates):.0f}/s median batch"
    )
    got = {k: int(v) for k, v in sorted(rejects(sp).items())}
    print(f"- rejects by reason: {got} (total {sum(got.values())})")
    print(
        f"- RSS MB: before {before.rss_mb:.0f}, after {after.rss_mb:.0f}, "
        f"peak {after.hwm_mb:.0f} (peak before {before.hwm_mb:.0f})"
    )
    print(f"- alive: {sp.returncode is None}, /healthz {sp.http('/healthz', 10)[0]}")


def start(name: str, server: NatsServer, tmp: Path, **values: object) -> ServiceProcess:
    values = {"metrics_port": free_port(), "nats_url": server.url, "heartbeat_s": 0.5, **values}
    sp = ServiceProcess(name, values, tmp / f"{name}.log", cwd=ROOT)
    sp.start()
    sp.wait_healthy(90)
    return sp


def inference(server: NatsServer, tmp: Path, models: dict[str, Path], n: int) -> None:
    import test_fuzz_inference as t
    from fuzz_payloads import frames

    sp = start("inference", server, tmp, model=models[t.YOLO], max_frame_bytes=t.MAX_BYTES)
    subject_of = Subjects().frames
    first = asyncio.run(t.real_photo_result(server.url, subject_of("real"), 1))
    before = memory(sp.pid)
    batches = st.lists(frames() | st.just(t.OVERSIZE), min_size=BATCH, max_size=BATCH)
    run = run_batches(batches, n, lambda b: t.fire(sp, server.url, subject_of, b), len)
    report("inference: frames", sp, before, run)
    after = asyncio.run(t.real_photo_result(server.url, subject_of("real"), 2))
    same = [d.label for d in after.detections] == [d.label for d in first.detections]
    print(f"- correct after: dog.jpg gives {[d.label for d in after.detections]} (same: {same})")
    sp.stop()


def publisher(server: NatsServer, tmp: Path, n: int) -> None:
    import test_fuzz_publisher as t

    sp = start("publisher", server, tmp, camera_forget_s=86400)  # keeps its counters
    asyncio.run(t.watching(sp, server.url))
    before = memory(sp.pid)
    batches = st.tuples(
        st.lists(t.NATS_MESSAGE, min_size=BATCH, max_size=BATCH),
        st.lists(t.KV_RECORD, max_size=10),
    )
    run = run_batches(
        batches,
        n,
        lambda b: t.fire(sp, server.url, t.Batch(*b)),
        lambda b: len(b[0]) + len(b[1]),
    )
    report("publisher: frames, results, heartbeats, cameras bucket", sp, before, run)
    asyncio.run(t.real_result(sp, server.url))
    print("- correct after: a real result is on /api/cameras")
    sp.stop()


def deployer(server: NatsServer, tmp: Path, models: dict[str, Path], n: int) -> None:
    import test_fuzz_deployer as t
    from fuzz_payloads import bad_archive

    good = tmp / "good.tar.gz"
    pack(models[t.FACE], good)
    sp = start("deployer", server, tmp, work_dir=tmp / "work", instance=t.OWNER)
    before = memory(sp.pid)
    calls = st.lists(t.API, min_size=BATCH, max_size=BATCH)
    run = run_batches(calls, n, lambda b: t.api(sp, server.url, b), len)
    report("deployer: API verbs", sp, before, run)
    beats = st.tuples(st.lists(t.HEARTBEATS, max_size=BATCH), st.lists(t.REPORTS, max_size=20))
    run = run_batches(
        beats,
        n // 4,
        lambda b: t.heartbeats_and_reports(sp, server.url, *b),
        lambda b: len(b[0]) + len(b[1]),
    )
    report("deployer: heartbeats and swap reports", sp, before, run)
    archives = st.lists(bad_archive(good.read_bytes()), min_size=5, max_size=5)
    run = run_batches(archives, max(20, n // 100), lambda b: t.uploads(server.url, tmp, b), len)
    report("deployer: malformed archives", sp, before, run)
    asyncio.run(t.good_upload(server.url, good))
    print("- correct after: a real package uploads and activates")
    sp.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000, help="per target")
    ap.add_argument("--only", choices=("inference", "publisher", "deployer"))
    args = ap.parse_args()
    print(f"# fuzz bench: {args.messages} messages per target, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="lensbus-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        server = NatsServer(tmp / "nats", log_file=tmp / "nats.log").start()
        try:
            models: dict[str, Path] = {}
            if args.only in (None, "inference", "deployer"):
                from lensbus_inference.packaging.demo_packages import build_demo

                cache = Path(os.environ.get("LENSBUS_TEST_MODELS") or tmp / "models")
                models = {k: Path(v) for k, v in build_demo(cache, []).items()}
            if args.only in (None, "inference"):
                inference(server, tmp, models, args.messages)
            if args.only in (None, "publisher"):
                publisher(server, tmp, args.messages)
            if args.only in (None, "deployer"):
                deployer(server, tmp, models, args.messages)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
