"""Server-Sent Events: the results and events as SSE bytes (serialized once for every
client), and the clients' bounded queues."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from lensbus.schemas import Result
from lensbus_publisher import metrics


def result_json(result: Result) -> dict[str, Any]:
    """A result as JSON for browsers and scripts (the mask PNG left out)."""
    out = result.model_dump(mode="json", exclude={"mask_png"})
    out["latency_s"] = round(result.latency_s, 6)
    out["has_mask"] = result.mask_png is not None
    return out


def sse(event: str, ident: int, data: dict[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return f"id: {ident}\nevent: {event}\ndata: {body}\n\n".encode()


class Subscribers:
    """SSE clients: a bounded queue each; a full queue loses its oldest item."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes | None]] = set()

    def add(self, size: int) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=size)
        self.queues.add(q)
        return q

    def remove(self, q: asyncio.Queue[bytes | None]) -> None:
        self.queues.discard(q)

    def send(self, item: bytes | None) -> None:
        for q in self.queues:
            if q.full():
                q.get_nowait()
                metrics.VIEWER_DROPS.labels("results", "slow_viewer").inc()
            q.put_nowait(item)
