"""Home Assistant and MQTT: nats-server's own MQTT listener, a real MQTT client (paho-mqtt)
as the ``mqtt`` user, the real analytics service (user ``analytics``) running a pipeline with
a zone and a line on results published on ``detections.<camera>``: discovery configs, zone
occupancy, line counts and events arrive on their topics; Home Assistant's birth message
has the sensors announced again; the mqtt user cannot read frames or results nor publish
results (the server refuses)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from nats.aio.client import Client

from lensbus import Subjects, encode
from lensbus.bus import connect as bus_connect
from lensbus.natsauth import authorization_block, generate_passwords, permissions
from lensbus.natsmqtt import MQTT_USER
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import Result
from lensbus.schemas.deploy import PipelineDeployment, PipelineRevision, pipeline_key
from lensbus.schemas.pipeline import Pipeline
from lensbus.schemas.result import Box, Detection, ModelRef
from lensbus.subjects import DEPLOYMENTS_BUCKET, InvalidName, mqtt_token

S = Subjects()
CAM = "mq1"
FRAMES = 16

PIPELINE = {
    "stages": [
        {"stage": "model", "model": "yolo:1"},
        {"stage": "track", "lost_s": 5.0},
        {
            "stage": "zones",
            "cameras": {
                CAM: {
                    "zones": [{"name": "right", "points": [(0.5, 0), (1, 0), (1, 1), (0.5, 1)]}],
                    "lines": [{"name": "door", "a": (0.5, 0.0), "b": (0.5, 1.0)}],
                }
            },
        },
    ]
}


def result(seq: int, t0: int) -> Result:
    """A person walking right across the door line into the right zone."""
    x = 0.05 + 0.05 * seq
    box = Box.from_normalized(x, 0.3, x + 0.2, 0.7, 640, 480)
    return Result(
        camera=CAM,
        seq=seq,
        capture_ns=t0 + seq * 100_000_000,
        result_ns=t0 + seq * 100_000_000 + 30_000_000,
        width=640,
        height=480,
        model=ModelRef(name="yolo", version="1"),
        task="detection",
        detections=[Detection(label="person", class_id=0, score=0.9, box=box)],
    )


class Mqtt:
    """A paho-mqtt client on its own thread; every message it receives, in order."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[str]] = {}
        self.cond = threading.Condition()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha-test")
        c.username_pw_set(user, password)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.connected: str | None = None
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.wait(lambda: self.connected is not None)
        assert self.connected == "Success", self.connected

    def _note(self, fn: Callable[[], None]) -> None:
        with self.cond:
            fn()
            self.cond.notify_all()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self._note(lambda: setattr(self, "connected", str(rc)))

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self._note(lambda: self.messages.append((msg.topic, msg.payload)))

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        self._note(lambda: self.subacks.__setitem__(mid, [str(rc) for rc in codes]))

    def wait(self, done: Callable[[], bool], timeout: float = 15.0) -> bool:
        with self.cond:
            return self.cond.wait_for(done, timeout)

    def subscribe(self, topic: str) -> list[str]:
        """Subscribe (QoS 1) and return the SUBACK's reason codes."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert self.wait(lambda: mid in self.subacks)
        return self.subacks[mid]

    def on(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[NatsServer, dict[str, str]]]:
    passwords = generate_passwords()
    srv = NatsServer(
        tmp_path / "nats",
        extra_config=authorization_block(passwords),
        log_file=tmp_path / "nats.log",
        mqtt_port=free_port(),
    ).start()
    try:
        yield srv, passwords
    finally:
        srv.stop()


async def put_pipeline(nc: Client) -> None:
    kv = await nc.jetstream().create_key_value(bucket=DEPLOYMENTS_BUCKET, history=5)
    pl = Pipeline.model_validate(PIPELINE)
    rec = PipelineDeployment(
        group="default",
        current=PipelineRevision(revision=1, pipeline=pl, activated_ns=time.time_ns()),
    )
    await kv.put(pipeline_key("default"), encode(rec))


async def wait_metric(svc: Any, name: str, labels: str, at_least: float) -> float:
    deadline = time.monotonic() + 15
    while (value := svc.metric(name, labels)) < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return float(value)


@pytest.mark.slow
async def test_home_assistant_sees_zones_lines_and_events(
    server: tuple[NatsServer, dict[str, str]], start_service: Any
) -> None:
    srv, passwords = server
    assert srv.mqtt_port is not None
    conns: list[Client] = []

    async def connect(user: str) -> Client:
        nc = await bus_connect(srv.url, name=f"t-{user}", user=user, password=passwords[user])
        conns.append(nc)
        return nc

    ha = Mqtt(srv.mqtt_port, MQTT_USER, passwords[MQTT_USER])
    try:
        await put_pipeline(await connect("deployer"))
        creds = {"nats_user": "analytics", "nats_password": passwords["analytics"]}
        svc = start_service("analytics", srv.url, reorder_wait_s=0.05, **creds)
        svc.wait_healthy()
        assert await wait_metric(svc, "lensbus_analytics_pipeline_updates_total", 'outcome="ok"', 1)
        mine = (f"lensbus/{CAM}/events", "lensbus/+/zone/+/+/occupancy", "lensbus/+/line/+/+/+")
        for topic in ("homeassistant/sensor/#", *mine):
            assert ha.subscribe(topic) == ["Granted QoS 1"], topic
        # Not for MQTT clients: frames, results (the server refuses the subscriptions); a
        # '#' under lensbus/ is also one on its parent level, which is not theirs.
        refused = (f"lensbus/frames/{CAM}", f"lensbus/results/{CAM}", "lensbus/frames/events")
        for topic in (*refused, f"lensbus/{CAM}/#"):
            assert ha.subscribe(topic) != ["Granted QoS 1"], topic

        inference = await connect("inference")
        t0 = time.time_ns()
        for seq in range(FRAMES):
            await inference.publish(S.detections(CAM), encode(result(seq, t0)))
        await inference.flush()

        node = f"lensbus_{CAM}"
        occupancy = f"lensbus/{CAM}/zone/right/person/occupancy"
        count = f"lensbus/{CAM}/line/door/out/person"
        occ_config = f"homeassistant/sensor/{node}/zone_right_person_occupancy/config"
        line_config = f"homeassistant/sensor/{node}/line_door_out_person/config"
        events = f"lensbus/{CAM}/events"

        def arrived() -> bool:
            triggers = {json.loads(p)["trigger"] for p in ha.on(events)}
            return (
                b"1" in ha.on(occupancy)
                and b"1" in ha.on(count)
                and bool(ha.on(occ_config) and ha.on(line_config))
                and {"enter", "cross"} <= triggers
            )

        assert await asyncio.to_thread(ha.wait, arrived), ha.messages
        config = json.loads(ha.on(line_config)[0])
        assert config["state_topic"] == count
        assert config["unique_id"] == f"{node}_line_door_out_person"
        assert config["state_class"] == "total_increasing"
        assert config["device"]["identifiers"] == [node]
        occ = json.loads(ha.on(occ_config)[0])
        assert occ["state_topic"] == occupancy and occ["state_class"] == "measurement"
        cross = next(json.loads(p) for p in ha.on(events) if b'"cross"' in p)
        assert (cross["zone"], cross["direction"], cross["camera"]) == ("door", "out", CAM)
        assert cross["track_id"] >= 1 and cross["label"] == "person"
        # Occupancy goes out on change only: the person stays inside.
        assert ha.on(occupancy) == [b"1"]

        # Home Assistant's birth message: every sensor announced again, with its value.
        n_configs = len(ha.on(occ_config))
        ha.client.publish("homeassistant/status", b"online", qos=1)
        assert await asyncio.to_thread(
            ha.wait,
            lambda: len(ha.on(occ_config)) > n_configs and len(ha.on(line_config)) > 1,
        )
        assert await asyncio.to_thread(ha.wait, lambda: len(ha.on(occupancy)) == 2)

        # The mqtt user may not publish results: refused, and no one receives it.
        client = await connect("client")
        leaked = await client.subscribe(S.results(CAM))
        await client.flush()
        ha.client.publish(f"lensbus/results/{CAM}", b"forged", qos=0)
        # A later marker: the server handles one connection's messages in order.
        assert ha.subscribe("homeassistant/status") == ["Granted QoS 1"]
        ha.client.publish("homeassistant/status", b"offline", qos=1)
        assert await asyncio.to_thread(ha.wait, lambda: b"offline" in ha.on("homeassistant/status"))
        await client.flush()
        assert leaked.pending_msgs == 0

        for kind, least in (("config", 4), ("occupancy", 2), ("count", 2), ("event", 2)):
            assert svc.metric("lensbus_analytics_mqtt_messages_total", f'kind="{kind}"') >= least
        assert svc.stop() == 0
        log = (srv.log_file or Path()).read_text()
        violations = [ln for ln in log.splitlines() if "Violation" in ln]
        # Only the MQTT client's refused attempts; the services overstepped nothing.
        assert violations and all('"ha-test"' in ln for ln in violations), violations
        forged = f'Publish Violation - Subject "lensbus.results.{CAM}"'
        assert any(forged in ln for ln in violations)
        assert any(f'Subject "lensbus.frames.{CAM}"' in ln for ln in violations)
    finally:
        ha.close()
        for nc in conns:
            await nc.close()


def test_mqtt_subjects_and_permissions() -> None:
    assert S.mqtt_occupancy("cam1", "door", "traffic light") == (
        "lensbus.cam1.zone.door.traffic_light.occupancy"
    )
    assert S.mqtt_line_count("cam1", "l1", "in", "car") == "lensbus.cam1.line.l1.in.car"
    assert S.mqtt_topic(S.mqtt_events("cam1")) == "lensbus/cam1/events"
    assert mqtt_token("a.b/c d") == "a_b_c_d"
    with pytest.raises(InvalidName):  # would be camera "events"'s frames
        S.mqtt_events("frames")
    perms = permissions(MQTT_USER)
    assert perms["publish"] == {"allow": ["homeassistant.status"]}
    assert "lensbus.frames.events" in perms["subscribe"]["deny"]
    assert not any("frames.*" in s or "results" in s for s in perms["subscribe"]["allow"])
    analytics = permissions("analytics")
    assert "homeassistant.sensor.*.*.config" in analytics["publish"]["allow"]
    assert "lensbus.frames.events" in analytics["publish"]["deny"]


def test_sensors_go_out_on_change_and_again_when_announced() -> None:
    """Pure logic of lensbus_analytics.mqtt_out (the zones' state stands in for a camera)."""
    from types import SimpleNamespace

    from lensbus_analytics.mqtt_out import MqttOut

    zones = SimpleNamespace(occupancy={("z", "traffic light"): 1}, counts={("l", "in", "car"): 2})
    cams: Any = {"c1": SimpleNamespace(zones=zones), "frames": SimpleNamespace(zones=zones)}
    out = MqttOut(S)
    first = [(subject, kind) for subject, _, kind in out.messages(cams, [])]
    assert first == [
        ("homeassistant.sensor.lensbus_c1.zone_z_traffic_light_occupancy.config", "config"),
        ("lensbus.c1.zone.z.traffic_light.occupancy", "occupancy"),
        ("homeassistant.sensor.lensbus_c1.line_l_in_car.config", "config"),
        ("lensbus.c1.line.l.in.car", "count"),
    ]  # camera "frames" has no topics
    assert out.messages(cams, []) == []  # nothing changed
    zones.counts[("l", "in", "car")] = 3
    assert [(s, d) for s, d, _ in out.messages(cams, [])] == [("lensbus.c1.line.l.in.car", b"3")]
    del zones.occupancy[("z", "traffic light")]  # the zone left the pipeline
    out.announce()
    assert [kind for _, _, kind in out.messages(cams, [])] == ["config", "count"]
    assert set(out.sensors) == {"lensbus.c1.line.l.in.car"}
    assert out.refused == {"frames"}
