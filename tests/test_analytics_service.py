"""The analytics service as a real process on a real nats-server: a group's pipeline in the
deployments KV, inference's results on ``detections.<camera>`` (out of order, one late),
tracked results on ``results.<camera>`` with stable track ids, zone and line events on
``events.<camera>``, its metrics; without a pipeline it republishes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import BucketNotFoundError

from lensbus import Subjects, decode, encode
from lensbus.bus import connect as bus_connect
from lensbus.natsauth import authorization_block, generate_passwords
from lensbus.natsserver import NatsServer
from lensbus.processes import ServiceProcess
from lensbus.schemas import Event, Result
from lensbus.schemas.deploy import PipelineDeployment, PipelineRevision, pipeline_key
from lensbus.schemas.pipeline import Pipeline
from lensbus.schemas.result import Box, Detection, ModelRef
from lensbus.subjects import DEPLOYMENTS_BUCKET

pytestmark = pytest.mark.slow

S = Subjects()
FRAMES = 24
LATE_SEQ = 10  # withheld until the window has given it up
WINDOW = 4  # reorder_frames: more held than this gives a gap up
PERSON_X0, STEP, WIDTH = 0.05, 0.03, 0.2  # the person walks right across a vertical line


def pipeline(extra_line: bool = False) -> Pipeline:
    lines = [{"name": "door", "a": (0.5, 0.0), "b": (0.5, 1.0)}]
    if extra_line:
        lines.append({"name": "kerb", "a": (0.0, 0.9), "b": (1.0, 0.9)})
    return Pipeline.model_validate(
        {
            "stages": [
                {"stage": "model", "model": "yolo:1"},
                {"stage": "track", "lost_s": 2.0},
                {
                    "stage": "zones",
                    "cameras": {
                        "anl1": {
                            "zones": [
                                {"name": "right", "points": [(0.5, 0), (1, 0), (1, 1), (0.5, 1)]}
                            ],
                            "lines": lines,
                        }
                    },
                },
            ]
        }
    )


async def put_pipeline(nc: Client, group: str, pl: Pipeline, revision: int) -> None:
    js = nc.jetstream()
    try:
        kv = await js.key_value(DEPLOYMENTS_BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=DEPLOYMENTS_BUCKET, history=5)
    rec = PipelineDeployment(
        group=group,
        current=PipelineRevision(revision=revision, pipeline=pl, activated_ns=time.time_ns()),
    )
    await kv.put(pipeline_key(group), encode(rec))


def detection(label: str, x: float, y: float, score: float = 0.9) -> Detection:
    box = Box.from_normalized(x, y, x + WIDTH, y + 0.4, 640, 480)
    return Detection(label=label, class_id=0 if label == "person" else 16, score=score, box=box)


def result(camera: str, seq: int, t0: int) -> Result:
    dets = [
        detection("person", PERSON_X0 + STEP * seq, 0.3),
        detection("dog", 0.02, 0.55, 0.8),  # still, left of the line
    ]
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=t0 + seq * 100_000_000,
        result_ns=t0 + seq * 100_000_000 + 30_000_000,
        width=640,
        height=480,
        model=ModelRef(name="yolo", version="1"),
        task="detection",
        detections=dets,
    )


def arrival_order() -> list[int]:
    """Pairs swapped (two replicas), LATE_SEQ sent once the window has given it up."""
    order = list(range(FRAMES))
    for i in range(1, FRAMES - 1, 4):
        order[i], order[i + 1] = order[i + 1], order[i]
    order.remove(LATE_SEQ)
    order.insert(order.index(LATE_SEQ + WINDOW + 2) + 1, LATE_SEQ)
    return order


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[Client]:
    client = await nats_py.connect(nats.url)
    yield client
    await client.drain()


async def collect(
    nc: Client, subject: str, cls: type[Any], into: list[Any], done: asyncio.Event, n: int
) -> Subscription:
    async def cb(msg: Msg) -> None:
        into.append(decode(msg.data, cls))
        if len(into) >= n:
            done.set()

    return await nc.subscribe(subject, cb=cb)


async def wait_metric(
    svc: ServiceProcess, name: str, labels: str, at_least: float, timeout: float = 15.0
) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = svc.metric(name, labels)
        if value >= at_least or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def test_tracks_reorders_zones_and_counts(
    nats: NatsServer, nc: Client, start_service: Any
) -> None:
    group, cam = "anl-track", "anl1"
    await put_pipeline(nc, group, pipeline(), 1)
    svc = start_service(
        "analytics", nats.url, group=group, reorder_frames=WINDOW, reorder_wait_s=5.0
    )
    svc.wait_healthy()
    assert await wait_metric(svc, "lensbus_analytics_pipeline_updates_total", 'outcome="ok"', 1)
    results: list[Result] = []
    events: list[Event] = []
    got_all = asyncio.Event()
    await collect(nc, S.results(cam), Result, results, got_all, FRAMES)
    await collect(nc, S.events(cam), Event, events, asyncio.Event(), 1)
    t0 = time.time_ns()
    await nc.publish(S.detections(cam), b"\x93not a result")
    for seq in arrival_order():
        if seq == FRAMES // 2 + WINDOW + 3:
            # A pipeline change half way: tracks and counts are kept.
            await put_pipeline(nc, group, pipeline(extra_line=True), 2)
            assert await wait_metric(
                svc, "lensbus_analytics_pipeline_updates_total", 'outcome="ok"', 2
            )
        await nc.publish(S.detections(cam), encode(result(cam, seq, t0)))
        await nc.flush()
    await asyncio.wait_for(got_all.wait(), 15)

    late = [r for r in results if r.seq == LATE_SEQ]
    tracked = [r for r in results if r.seq != LATE_SEQ]
    assert len(late) == 1 and all(d.track_id is None for d in late[0].detections)
    assert [r.seq for r in tracked] == sorted(r.seq for r in tracked)  # back in order
    assert len(tracked) == FRAMES - 1
    persons = {d.track_id for r in tracked for d in r.detections if d.label == "person"}
    dogs = {d.track_id for r in tracked for d in r.detections if d.label == "dog"}
    assert len(persons) == 1 and len(dogs) == 1 and persons != dogs, (persons, dogs)
    person = next(iter(persons))
    assert person is not None
    last = tracked[-1]
    assert [(s.stage, s.kind) for s in last.stages] == [("track", "track"), ("zones", "zones")]
    p = next(d for d in last.detections if d.label == "person")
    assert p.track_label == "person" and p.track_since_ns is not None
    assert abs(p.track_since_ns - t0) < 1_000  # float seconds inside the tracker

    # The person's bottom centre crosses the door line from its right (a->b points down
    # the image, so the left half is a->b's right side): 'out', and enters the right zone.
    crosses = [e for e in events if e.trigger == "cross"]
    assert [(e.zone, e.direction, e.track_id, e.label) for e in crosses] == [
        ("door", "out", person, "person")
    ]
    enters = [e for e in events if e.trigger == "enter"]
    assert [(e.zone, e.track_id) for e in enters] == [("right", person)]
    assert all(e.rule == e.zone and e.camera == cam and e.model for e in crosses + enters)

    labels = f'camera="{cam}"'
    assert svc.metric("lensbus_analytics_results_late_total", labels) == 1
    assert svc.metric("lensbus_analytics_results_reordered_total", labels) >= 5
    assert svc.metric("lensbus_analytics_seq_gaps_total", labels) == 1
    assert svc.metric("lensbus_analytics_tracks_active", labels) == 2
    assert svc.metric("lensbus_messages_rejected_total", 'reason="malformed"') >= 1
    # (labels as the harness reads them: sorted)
    door = f'camera="{cam}",direction="out",label="person",line="door"'
    assert svc.metric("lensbus_analytics_line_crossings_total", door) == 1
    occupied = f'camera="{cam}",label="person",zone="right"'
    assert svc.metric("lensbus_analytics_zone_occupancy", occupied) == 1
    assert svc.metric("lensbus_analytics_stage_seconds_count", f'{labels},stage="track"') == 23

    # The pipeline deleted: the work stops, the camera's series go, nothing is republished.
    kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
    await kv.delete(pipeline_key(group))
    assert await wait_metric(
        svc, "lensbus_analytics_pipeline_updates_total", 'outcome="removed"', 1
    )
    await nc.publish(S.detections(cam), encode(result(cam, FRAMES, t0)))
    assert await wait_metric(svc, "lensbus_analytics_results_ignored_total", "", 1) == 1
    assert f"lensbus_analytics_tracks_active{{{labels}}}" not in svc.metrics()
    assert f"lensbus_analytics_zone_occupancy{{{occupied}}}" not in svc.metrics()
    await nc.flush()
    assert len(results) == FRAMES
    assert svc.stop() == 0


async def test_without_a_pipeline_nothing_is_republished(
    nats: NatsServer, nc: Client, start_service: Any
) -> None:
    cam = "anl2"
    svc = start_service("analytics", nats.url, group="anl-none")
    svc.wait_healthy()
    results: list[Result] = []
    await collect(nc, S.results(cam), Result, results, asyncio.Event(), 1)
    t0 = time.time_ns()
    for seq in range(5):
        await nc.publish(S.detections(cam), encode(result(cam, seq, t0)))
    await nc.flush()
    assert await wait_metric(svc, "lensbus_analytics_results_ignored_total", "", 5) == 5
    await nc.flush()  # anything it had published would have reached us by now
    assert results == []
    assert svc.stop() == 0


async def test_runs_as_its_own_nats_user(tmp_path: Path, start_service: Any) -> None:
    """The deployer writes the pipeline, inference publishes detections, analytics (user
    ``analytics``) publishes tracked results a client reads: no permission violation."""
    passwords = generate_passwords()
    log_file = tmp_path / "nats.log"
    server = NatsServer(
        tmp_path / "nats", extra_config=authorization_block(passwords), log_file=log_file
    ).start()
    conns: list[Client] = []

    async def connect(user: str) -> Client:
        nc = await bus_connect(
            server.url, name=f"test-{user}", user=user, password=passwords[user], reconnect=False
        )
        conns.append(nc)
        return nc

    try:
        group, cam = "default", "anl3"
        await put_pipeline(await connect("deployer"), group, pipeline(), 1)
        creds = {"nats_user": "analytics", "nats_password": passwords["analytics"]}
        svc = start_service("analytics", server.url, group=group, reorder_wait_s=0.05, **creds)
        svc.wait_healthy()
        assert await wait_metric(svc, "lensbus_analytics_pipeline_updates_total", 'outcome="ok"', 1)
        results: list[Result] = []
        done = asyncio.Event()
        await collect(await connect("client"), S.results(cam), Result, results, done, 6)
        inference = await connect("inference")
        t0 = time.time_ns()
        for seq in range(6):
            await inference.publish(S.detections(cam), encode(result(cam, seq, t0)))
        await inference.flush()
        await asyncio.wait_for(done.wait(), 15)
        assert [r.seq for r in results] == list(range(6))
        assert all(d.track_id is not None for r in results for d in r.detections)
        assert svc.stop() == 0
        violations = [ln for ln in log_file.read_text().splitlines() if "Violation" in ln]
        assert violations == []
    finally:
        for nc in conns:
            await nc.close()
        server.stop()


# ---- the reorder window (pure logic) ---------------------------------------------------------


def test_reorder_holds_until_the_missing_seq_arrives() -> None:
    from lensbus_analytics.reorder import Reorder

    r: Reorder[int] = Reorder(frames=4, wait_s=1.0)
    assert r.push(0, 0, 0.0).ready == []  # the first waits: an earlier one may follow
    assert r.flush(1.0).ready == [0]  # ... for wait_s
    step = r.push(2, 2, 1.0)
    assert step.ready == [] and step.held
    assert r.push(1, 1, 1.1).ready == [1, 2]


def test_reorder_gives_a_gap_up_by_size_or_time_and_a_late_seq_is_late() -> None:
    from lensbus_analytics.reorder import Reorder

    r: Reorder[int] = Reorder(frames=2, wait_s=10.0)
    r.next_seq = 5
    assert r.push(7, 7, 0.0).ready == []
    assert r.push(8, 8, 0.0).ready == []
    step = r.push(9, 9, 0.0)  # three held > frames: seqs 5 and 6 given up
    assert step.ready == [7, 8, 9] and step.gaps == 2
    assert r.push(6, 6, 0.0).late
    r2: Reorder[int] = Reorder(frames=8, wait_s=0.5)
    r2.next_seq = 1
    r2.push(3, 3, 0.0)
    assert r2.flush(0.4).ready == []
    step = r2.flush(0.5)
    assert step.ready == [3] and step.gaps == 2


def test_reorder_starts_afresh_when_capture_restarts() -> None:
    from lensbus_analytics.reorder import Reorder

    r: Reorder[int] = Reorder(frames=2, wait_s=10.0)
    r.next_seq = 1000
    assert r.push(1001, 1001, 0.0).ready == []
    step = r.push(0, 0, 0.0)  # far behind: seqs start again, not a late result
    assert not step.late and step.ready == [1001]
    assert r.push(1, 1, 0.0).ready == []  # 0 still waits as a first result would
    assert r.push(2, 2, 0.0).ready == [0, 1, 2]
    assert r.push(2, 2, 0.0).late  # a duplicate
