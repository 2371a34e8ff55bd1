"""``greengrasssdk``: ``client('iot-data').publish(topic=..., payload=...)`` onto NATS.

What a DeepLens function published to AWS IoT becomes a
:class:`~lensbus.schemas.project.ProjectMessage` on
``<prefix>.projects.<project>.<camera>.<token>``: ``token`` is the IoT topic's last level
made a subject token (``$aws/things/<thing>/infer`` -> ``infer``; characters a subject token
cannot hold become ``_``), the whole IoT topic is kept in the message's ``topic``, and the
payload is decoded when it is JSON (the samples send ``json.dumps(cloud_output)``), kept as
text otherwise (their error strings). The camera, seq and capture time are those of the
frame the function got last; what it publishes before its first frame is held until then.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from prometheus_client import Counter

from lensbus.codec import encode
from lensbus.projects.deeplens import runtime
from lensbus.schemas.project import ProjectMessage

__all__ = ["IoTDataClient", "client"]

PUBLISHED = Counter(
    "lensbus_deeplens_published_total",
    "What DeepLens functions sent: IoT messages and local-display frames",
    ["kind"],
)

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def topic_token(topic: str) -> str:
    """The subject token an IoT topic's messages go to: its last non-empty level."""
    levels = [lv for lv in topic.split("/") if lv.strip()]
    token = _NOT_TOKEN.sub("_", levels[-1] if levels else "").lstrip("_")[:64]
    return token or "iot"


def _payload(payload: Any) -> Any:
    if isinstance(payload, bytes | bytearray):
        try:
            payload = bytes(payload).decode()
        except UnicodeDecodeError:
            return bytes(payload)
    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except ValueError:
            return payload
    return payload


class IoTDataClient:
    """The ``iot-data`` client: only ``publish`` is a DeepLens function's."""

    def publish(self, topic: str = "", payload: Any = b"", **_: Any) -> None:
        """Send ``payload`` as a ProjectMessage; ``qos`` and ``queueFullPolicy`` do not apply."""
        bridge = runtime.current()
        value = _payload(payload)
        token = topic_token(topic)
        published_ns = time.time_ns()
        # The frame it belongs to: the last one the function got (0 before its first).
        seq, capture_ns = runtime.STATE.seq, runtime.STATE.capture_ns

        def send(camera: str) -> None:
            message = ProjectMessage(
                project=bridge.project,
                version=bridge.version,
                camera=camera,
                topic=topic,
                seq=seq,
                capture_ns=capture_ns,
                published_ns=published_ns,
                payload=value,
            )
            bridge.publish(
                bridge.subjects.project_output(bridge.project, camera, token), encode(message)
            )
            PUBLISHED.labels("iot").inc()
            runtime.STATE.messages += 1

        runtime.STATE.on_camera(send)


def client(name: str, **_: Any) -> IoTDataClient:
    """``greengrasssdk.client('iot-data')``; other Greengrass clients do not exist here."""
    if name != "iot-data":
        raise ValueError(
            f"greengrasssdk.client({name!r}): only 'iot-data' (publish) runs on lensbus"
        )
    return IoTDataClient()
