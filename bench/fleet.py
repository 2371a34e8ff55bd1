"""Fleet catch-up benchmark (run by hand, not a test): how long a device needs, once its leaf
link to the hub returns, until the hub's fleet stream holds every result it made offline.

A hub and a device, each a real nats-server with its own JetStream domain (the device a leaf
node of the hub, ``lensbus.natsleaf``'s configs), a real hub deployer (``lensbus fleet add
D1`` makes the fleet stream's source). With the link cut (the device's server restarted
without its leaf remote), N minutes' worth of results at 30 results/s (real ``Result``
messages with 3 detections) go straight into the device's results stream; the link is
restored and the hub's fleet stream polled until it holds them all. Prints, per N: the time to
the leaf link, to the first result sourced and to the last, and results/s while catching up.

    python bench/fleet.py                      # N = 1 and 5 minutes
    python bench/fleet.py --minutes 1 --outage-s 60   # the link held cut a minute first
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats as nats_py
from nats.js import JetStreamContext

from lensbus import Subjects, encode
from lensbus.deployclient import DeployClient
from lensbus.natsleaf import device_jetstream, device_leafnodes, hub_jetstream, hub_leafnodes
from lensbus.natsserver import NatsServer, free_port
from lensbus.processes import ServiceProcess
from lensbus.schemas import Box, Detection, ModelRef, Result

DEVICE = "D1"
CAMERA = "bench"
RATE = 30  # results per second, one camera
S = Subjects()


def result(seq: int) -> bytes:
    now = time.time_ns()
    boxes = [
        Box(
            xmin=0.1 * i,
            ymin=0.2,
            xmax=0.1 * i + 0.05,
            ymax=0.4,
            left=192 * i,
            top=216,
            right=192 * i + 96,
            bottom=432,
        )
        for i in range(3)
    ]
    return encode(
        Result(
            camera=CAMERA,
            seq=seq,
            capture_ns=now,
            result_ns=now,
            width=1920,
            height=1080,
            model=ModelRef(name="yolov3-tiny", version="1", framework="onnx", device="cpu"),
            task="detection",
            instance="bench",
            detections=[Detection(label="person", class_id=0, score=0.9, box=b) for b in boxes],
        )
    )


async def fill(js: JetStreamContext, count: int) -> None:
    """``count`` results into the device's stream, acknowledged, 500 in flight at a time."""
    for start in range(0, count, 500):
        batch = [result(seq) for seq in range(start, min(start + 500, count))]
        await asyncio.gather(*(js.publish(S.results(CAMERA), data) for data in batch))


async def wait_count(js: JetStreamContext, stream: str, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await js.stream_info(stream)).state.messages >= count:
                return time.monotonic()
        except Exception:  # the stream not there yet
            pass
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{stream} did not reach {count} messages in {timeout:g} s")


async def linked(hub_js: JetStreamContext, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await hub_js.account_info()
            return time.monotonic()
        except Exception:
            await asyncio.sleep(0.02)
    raise TimeoutError("the leaf link did not come up")


class Pair:
    """The hub (nats-server and deployer) and the device's nats-server; ``cut()`` and
    ``restore()`` restart the device's server without, then with, its leaf remote."""

    def __init__(self, root: Path) -> None:
        leaf_port = free_port()
        self.hub = NatsServer(
            root / "hub",
            server_name="hub",
            jetstream_config=hub_jetstream(),
            extra_config=hub_leafnodes(leaf_port, "127.0.0.1"),
        )
        self.remote = device_leafnodes([f"nats-leaf://127.0.0.1:{leaf_port}"])
        self.dev = NatsServer(
            root / DEVICE, server_name=DEVICE, jetstream_config=device_jetstream(DEVICE)
        )
        self.dep = ServiceProcess(
            "deployer",
            {
                "nats_url": self.hub.url,
                "metrics_port": free_port(),
                "work_dir": str(root / "dep"),
                "fleet_hub": "true",
            },
            root / "deployer.log",
        )

    def cut(self) -> None:
        self.dev.stop()
        self.dev.extra_config = ""
        self.dev.start()

    def restore(self) -> float:
        self.dev.stop()
        self.dev.extra_config = self.remote
        t0 = time.monotonic()
        self.dev.start()
        return t0

    def stop(self) -> None:
        self.dep.stop()
        self.dev.stop()
        self.hub.stop()


async def run_one(
    root: Path, minutes: float, outage_s: float, linked_first: bool
) -> dict[str, float]:
    pair = Pair(root)
    pair.hub.start()
    pair.dev.extra_config = pair.remote if linked_first else ""
    pair.dev.start()
    pair.dep.start()
    pair.dep.wait_healthy(60)
    hub_nc = await nats_py.connect(pair.hub.url)
    hjs = hub_nc.jetstream()
    try:
        dev_nc = await nats_py.connect(pair.dev.url)
        await dev_nc.jetstream().add_stream(
            name=S.results_stream, subjects=[S.all_results(), S.all_events()]
        )
        await dev_nc.close()
        async with await DeployClient.connect(pair.hub.url, timeout_s=30) as dc:
            await dc.fleet_add(DEVICE)
        count = int(minutes * 60 * RATE)
        if linked_first:  # the source running before the outage, as on a device that was online
            await linked(hub_nc.jetstream(domain=DEVICE))
            dev_nc = await nats_py.connect(pair.dev.url)
            await dev_nc.jetstream().publish(S.results(CAMERA), result(0))
            await dev_nc.close()
            await wait_count(hjs, S.fleet_results_stream, 1, 120)
            count += 1
            pair.cut()
        t_cut = time.monotonic()
        dev_nc = await nats_py.connect(pair.dev.url)
        await fill(dev_nc.jetstream(), int(minutes * 60 * RATE))
        await dev_nc.close()
        await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - t_cut)))
        t0 = pair.restore()
        t_link = await linked(hub_nc.jetstream(domain=DEVICE))
        t_first = await wait_count(hjs, S.fleet_results_stream, 2 if linked_first else 1, 600)
        t_last = await wait_count(hjs, S.fleet_results_stream, count, 600)
    finally:
        await hub_nc.close()
        pair.stop()
    return {
        "results": count,
        "outage": t0 - t_cut,
        "link_s": t_link - t0,
        "first_s": t_first - t0,
        "all_s": t_last - t0,
        "rate": count / max(t_last - t_first, 1e-6),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument(
        "--outage-s", type=float, default=0.0, help="hold the link cut this long (at least)"
    )
    parser.add_argument(
        "--added-offline",
        action="store_true",
        help="the device added (fleet add) while cut off: its source never ran before",
    )
    args = parser.parse_args()
    print("minutes  results  outage_s  link_s  first_s  all_s  results/s (catching up)")
    for minutes in args.minutes:
        with tempfile.TemporaryDirectory(prefix="lensbus-fleet-bench-") as tmp:
            r = await run_one(Path(tmp), minutes, args.outage_s, not args.added_offline)
        print(
            f"{minutes:7g}  {r['results']:7.0f}  {r['outage']:8.1f}  {r['link_s']:6.2f}  "
            f"{r['first_s']:7.2f}  {r['all_s']:5.2f}  {r['rate']:9.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
