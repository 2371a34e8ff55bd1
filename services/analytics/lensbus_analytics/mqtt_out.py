"""Events, zone occupancy and line counts for MQTT clients, with Home Assistant discovery.

nats-server's own MQTT listener (:mod:`lensbus.natsmqtt`) maps an MQTT topic's levels to a
subject's tokens, so plain NATS publishes on the ``Subjects.mqtt_*`` subjects reach MQTT
subscribers: JSON, never msgpack (an event is its ``docs/schemas/event.json`` as JSON; an
occupancy or a count is a number).

They arrive as QoS 0 and never retained: retain is an MQTT publisher's flag and a NATS
message has none. So Home Assistant, which reads its discovery configs from retained
messages after a restart, gets them again when it says so (``online`` on
``homeassistant/status``, its birth message), on a pipeline change, and when a sensor first
has a value (at start: a sensor exists once its zone or line has seen a label); each
announcement is followed by the sensor's value, and a value goes out again on each change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from lensbus.errors import InvalidName
from lensbus.schemas import Event
from lensbus.subjects import Subjects, mqtt_token
from lensbus_analytics import metrics
from lensbus_analytics.camera import CameraAnalytics
from lensbus_analytics.zones import CameraZoneState

log = logging.getLogger(__name__)

# (subject, payload, kind): kind labels lensbus_analytics_mqtt_messages_total.
Message = tuple[str, bytes, str]


@dataclass(frozen=True)
class Sensor:
    """One Home Assistant sensor: a zone's occupancy or a line's count of one label."""

    camera: str
    state: str  # the subject its value goes to
    object_id: str
    name: str
    kind: str  # occupancy | count


class MqttOut:
    def __init__(self, subjects: Subjects) -> None:
        self.s = subjects
        self.sensors: dict[str, Sensor] = {}  # announced, by state subject
        self.values: dict[str, int] = {}  # last value sent, by state subject
        self.announce_due = False
        self.refused: set[str] = set()  # cameras with no MQTT topics (said once each)

    def announce(self) -> None:
        """Send every sensor's config and value with the next messages."""
        self.announce_due = True

    def messages(
        self, cameras: Mapping[str, CameraAnalytics], events: Iterable[Event]
    ) -> list[Message]:
        """What to publish after a step: the events, then the sensors' configs and values
        that are new, changed, or due for an announcement."""
        out: list[Message] = []
        for event in events:
            if self._allowed(event.camera):
                data = event.model_dump_json(exclude_none=True).encode()
                out.append((self.s.mqtt_events(event.camera), data, "event"))
        announce, self.announce_due = self.announce_due, False
        current: set[str] = set()
        for camera, cam in cameras.items():
            if cam.zones is None or not self._allowed(camera):
                continue
            for sensor, value in self._sensors(camera, cam.zones):
                current.add(sensor.state)
                if announce or sensor.state not in self.sensors:
                    self.sensors[sensor.state] = sensor
                    out.append(self.config(sensor))
                elif self.values.get(sensor.state) == value:
                    continue
                self.values[sensor.state] = value
                out.append((sensor.state, str(value).encode(), sensor.kind))
        if announce:  # zones, lines or cameras gone from the pipeline are forgotten
            for gone in self.sensors.keys() - current:
                del self.sensors[gone]
                self.values.pop(gone, None)
        return out

    def _allowed(self, camera: str) -> bool:
        if camera in self.refused:
            return False
        try:
            self.s.mqtt_camera(camera)
        except InvalidName as exc:
            self.refused.add(camera)
            metrics.MQTT_SKIPPED.labels("reserved_camera").inc()
            log.warning("camera %s: %s (rename it to reach MQTT clients)", camera, exc)
            return False
        return True

    def _sensors(self, camera: str, zones: CameraZoneState) -> Iterator[tuple[Sensor, int]]:
        for (zone, label), n in zones.occupancy.items():
            object_id = f"zone_{zone}_{mqtt_token(label)}_occupancy"
            subject = self.s.mqtt_occupancy(camera, zone, label)
            yield Sensor(camera, subject, object_id, f"{zone} {label}", "occupancy"), n
        for (line, direction, label), n in zones.counts.items():
            object_id = f"line_{line}_{direction}_{mqtt_token(label)}"
            subject = self.s.mqtt_line_count(camera, line, direction, label)
            name = f"{line} {direction} {label}"
            yield Sensor(camera, subject, object_id, name, "count"), n

    def config(self, sensor: Sensor) -> Message:
        """Home Assistant's MQTT discovery config of a sensor (one device per camera)."""
        node = self.s.ha_node_id(sensor.camera)
        payload = {
            "name": sensor.name,
            "unique_id": f"{node}_{sensor.object_id}",
            "object_id": f"{node}_{sensor.object_id}",
            "state_topic": self.s.mqtt_topic(sensor.state),
            "unit_of_measurement": "objects" if sensor.kind == "occupancy" else "crossings",
            # A count restarts at 0 with the service: total_increasing reads that as a reset.
            "state_class": "measurement" if sensor.kind == "occupancy" else "total_increasing",
            "icon": "mdi:account-group" if sensor.kind == "occupancy" else "mdi:counter",
            "device": {
                "identifiers": [node],
                "name": f"lensbus {sensor.camera}",
                "manufacturer": "lensbus",
                "model": "camera analytics",
            },
        }
        subject = self.s.ha_sensor_config(node, sensor.object_id)
        return subject, json.dumps(payload).encode(), "config"
