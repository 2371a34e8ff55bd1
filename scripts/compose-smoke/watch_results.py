#!/usr/bin/env python3
"""A plain NATS subscriber for scripts/compose-smoke.sh: wait for results with real labels.

Connects like any program would (nats-py with nkeys, and msgpack; no lensbus import) as the
NATS user ``client``, over TLS with its nkey seed file and the CA, subscribes to
``lensbus.results.<camera>`` and ``lensbus.status.>`` and waits until at least
``--min-results`` results arrived, ``--min-labelled`` of them with a detection whose label is
one of the model's labels (``--labels``: the package's ``model.json`` or a names file), and
results came from ``--replicas`` inference instances.
With ``--check-denied`` it also publishes a frame as ``client`` and expects the server to
refuse it (the shipped NATS config's permissions are in force). Prints a summary; exit 0
when all of it was seen, 1 otherwise. The seed file comes from --nkey, the CA from --tls-ca
(compose-setup's nkeys/client.nk and tls/ca.pem).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import nats


def read_labels(path: Path) -> set[str]:
    text = path.read_text()
    if path.suffix == ".json":
        return {str(label) for label in json.loads(text)["labels"]}
    return {line.strip() for line in text.splitlines() if line.strip()}


async def watch(args: argparse.Namespace) -> int:
    labels = read_labels(Path(args.labels))
    seen: Counter[str] = Counter()
    results = labelled = 0
    instances: set[str] = set()
    services: dict[str, set[str]] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    def complete() -> bool:
        return (
            results >= args.min_results
            and labelled >= args.min_labelled
            and len(instances) >= args.replicas
        )

    async def on_result(msg: Any) -> None:
        nonlocal results, labelled
        r = msgpack.unpackb(msg.data, raw=False)
        results += 1
        instances.add(str(r.get("instance", "")))
        latencies.append((r["result_ns"] - r["capture_ns"]) / 1e9)
        names = [d["label"] for d in r.get("detections", [])]
        if any(n in labels for n in names):
            labelled += 1
        seen.update(names)
        if complete():
            done.set()

    async def on_status(msg: Any) -> None:
        st = msgpack.unpackb(msg.data, raw=False)
        services.setdefault(str(st.get("service")), set()).add(str(st.get("instance")))

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    t0 = time.monotonic()
    nc = await nats.connect(
        args.url,
        # An nkey carries no user name: the inbox must be the user's own (its permissions).
        nkeys_seed=args.nkey,
        inbox_prefix=f"_INBOX_{args.user}",
        tls=ssl.create_default_context(cafile=args.tls_ca),
        error_cb=on_error,
        connect_timeout=5,
        max_reconnect_attempts=-1,
    )
    await nc.subscribe(f"{args.prefix}.results.{args.camera}", cb=on_result)
    await nc.subscribe(f"{args.prefix}.status.>", cb=on_status)
    try:
        await asyncio.wait_for(done.wait(), args.timeout)
        ok = True
    except TimeoutError:
        ok = False
    denied = None
    if args.check_denied:
        forged = f"{args.prefix}.frames.{args.camera}"
        await nc.publish(forged, b"not a frame")
        await nc.flush()
        await asyncio.sleep(0.5)
        denied = any(f'violation for publish to "{forged}"' in e.lower() for e in errors)
        ok = ok and denied
    await nc.close()
    took = time.monotonic() - t0
    summary = {
        "ok": ok,
        "seconds": round(took, 1),
        "results": results,
        "with_real_labels": labelled,
        "labels": dict(seen.most_common(10)),
        "inference_instances": sorted(instances),
        "heartbeats_from": {k: len(v) for k, v in sorted(services.items())},
        "latency_p50_ms": round(statistics.median(latencies) * 1000) if latencies else None,
        "latency_max_ms": round(max(latencies) * 1000) if latencies else None,
        "client_frame_publish_denied": denied,
        "nats_errors": errors[:5],
    }
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="tls://127.0.0.1:4222")
    p.add_argument("--user", default="client", help="whose --nkey it is (its inbox)")
    p.add_argument("--nkey", required=True, help="the user's nkey seed file")
    p.add_argument("--tls-ca", required=True, help="the CA of the server's certificate")
    p.add_argument("--prefix", default="lensbus")
    p.add_argument("--camera", default="cam1")
    p.add_argument("--labels", required=True, help="model.json or a names file")
    p.add_argument("--min-results", type=int, default=20)
    p.add_argument("--min-labelled", type=int, default=5)
    p.add_argument("--replicas", type=int, default=1, help="inference instances to hear from")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--check-denied", action="store_true", help="client may not publish frames")
    args = p.parse_args()
    return asyncio.run(watch(args))


if __name__ == "__main__":
    sys.exit(main())
