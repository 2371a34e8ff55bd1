"""nats-server's own MQTT listener: its config block and the ``mqtt`` user's permissions.

nats-server is the MQTT broker (MQTT 3.1.1, QoS 0-2; no bridge, no broker of our own): an
MQTT topic ``a/b/c`` is the NATS subject ``a.b.c``, so the analytics service's NATS publishes
on :meth:`lensbus.subjects.Subjects.mqtt_events` and the rest reach MQTT subscribers. The
listener needs a ``server_name`` and JetStream (MQTT sessions, retained messages and QoS 1
deliveries live in streams the server manages with its own internal clients, so the MQTT
user needs no JetStream permissions: ``tests/test_mqtt.py`` checks it on the real server).

The ``mqtt`` user (Home Assistant, Node-RED, any MQTT client) may subscribe to the lensbus
MQTT subjects and Home Assistant's (``homeassistant`` and ``homeassistant/#``: an MQTT ``#``
subscription is also one on its parent level) and publish only Home Assistant's birth
message; it reads no frames or results and publishes nothing lensbus reads.
"""

from __future__ import annotations

from typing import Any

from lensbus.subjects import HA_PREFIX, Subjects

MQTT_USER = "mqtt"
DEFAULT_MQTT_PORT = 1883


def mqtt_permissions(prefix: str) -> dict[str, Any]:
    """The ``mqtt`` user's permissions (see the module's docstring)."""
    s = Subjects(prefix)
    return {
        "publish": {"allow": [s.ha_status()]},
        "subscribe": {
            "allow": [*s.mqtt_all(), HA_PREFIX, f"{HA_PREFIX}.>"],
            "deny": s.mqtt_reserved(),
        },
    }


def analytics_mqtt(prefix: str) -> dict[str, list[str]]:
    """What the analytics service adds for MQTT: publishing the MQTT subjects and the
    discovery configs, reading Home Assistant's birth message."""
    s = Subjects(prefix)
    return {
        "publish": [*s.mqtt_all(), s.ha_all_sensor_configs()],
        "deny": s.mqtt_reserved(),
        "subscribe": [s.ha_status()],
    }


def mqtt_block(port: int, host: str = "") -> str:
    """nats-server config text for the MQTT listener on ``host:port`` (every interface
    without ``host``); users authenticate with their NATS user name and password."""
    listen = f"{host}:{port}" if host else f"0.0.0.0:{port}"
    return f'mqtt {{\n  listen: "{listen}"\n}}\n'
