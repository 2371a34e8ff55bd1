"""Publisher logic without processes: settings, rules, drawing, the frame/result rings, and
``lensbus watch``'s argument parsing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lensbus.cli.watch import parse_since
from lensbus.codec import encode
from lensbus.images import decode_jpeg, encode_jpeg
from lensbus.schemas import (
    Box,
    ClassScore,
    Detection,
    Event,
    FrameEnvelope,
    ModelRef,
    Result,
    Segment,
    snapshot_name,
)
from lensbus.settings import SettingsError, load_settings
from lensbus_publisher.camera import Signal
from lensbus_publisher.config import PublisherSettings, Rule, is_loopback
from lensbus_publisher.hub import Hub
from lensbus_publisher.render import color_for, line_width, render
from lensbus_publisher.rules import RuleEngine, best_match

MODEL = ModelRef(name="m", version="1", framework="onnx", device="cpu")


def result(
    seq: int,
    labels: Sequence[tuple[str, float]] = (),
    camera: str = "cam",
    t_s: float | None = None,
    width: int = 640,
    height: int = 480,
) -> Result:
    capture_ns = int((t_s if t_s is not None else seq) * 1e9)
    dets = [
        Detection(
            label=label,
            class_id=i,
            score=score,
            box=Box.from_normalized(0.25, 0.25, 0.75, 0.75, width, height),
        )
        for i, (label, score) in enumerate(labels)
    ]
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=capture_ns,
        result_ns=capture_ns + 50_000_000,
        width=width,
        height=height,
        model=MODEL,
        task="detection",
        detections=dets,
    )


# ---- settings ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("LENSBUS_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("::") and not is_loopback("camera.local")


def test_token_required_off_loopback(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings(PublisherSettings).token is None  # 127.0.0.1 by default
    clean_env.setenv("LENSBUS_PUBLISHER_HOST", "0.0.0.0")
    with pytest.raises(SettingsError) as err:
        load_settings(PublisherSettings)
    assert "token (env LENSBUS_PUBLISHER_TOKEN)" in str(err.value)
    clean_env.setenv("LENSBUS_PUBLISHER_TOKEN", "")  # an empty token is no token
    with pytest.raises(SettingsError):
        load_settings(PublisherSettings)
    clean_env.setenv("LENSBUS_PUBLISHER_TOKEN", "s3cret-value")
    s = load_settings(PublisherSettings)
    assert s.token is not None and s.token.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(s) and "s3cret-value" not in str(s.model_dump())


def test_one_server_for_page_and_metrics(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings(PublisherSettings)
    assert (s.host, s.port, s.metrics_host, s.metrics_port) == ("127.0.0.1", 8080) * 2
    s = load_settings(PublisherSettings, metrics_port=9300)  # the harness sets this one
    assert s.port == s.metrics_port == 9300
    s = load_settings(PublisherSettings, port=9400, metrics_port=9400)
    assert s.port == 9400
    with pytest.raises(SettingsError, match="metrics_port"):
        load_settings(PublisherSettings, port=9400, metrics_port=9401)
    with pytest.raises(SettingsError, match="metrics_host"):
        load_settings(PublisherSettings, metrics_host="0.0.0.0")


def test_rules_from_env(clean_env: pytest.MonkeyPatch) -> None:
    rules = [
        {
            "name": "dog",
            "labels": ["dog"],
            "min_score": 0.6,
            "consecutive": 2,
            "cooldown_s": 5,
            "webhook": "http://127.0.0.1:9/hook",
        },
        {"name": "people", "labels": ["person", "face"], "cameras": ["door"]},
    ]
    clean_env.setenv("LENSBUS_PUBLISHER_RULES", json.dumps(rules))
    s = load_settings(PublisherSettings)
    assert [r.name for r in s.rules] == ["dog", "people"]
    assert s.rules[1].labels == {"person", "face"} and s.rules[1].cameras == {"door"}
    # Events POST to str(rule.webhook): the URL as given, and no webhook for rule 2.
    assert [str(r.webhook) if r.webhook else None for r in s.rules] == [
        "http://127.0.0.1:9/hook",
        None,
    ]
    clean_env.setenv("LENSBUS_PUBLISHER_RULES", json.dumps([rules[0], rules[0]]))
    with pytest.raises(SettingsError, match="unique"):
        load_settings(PublisherSettings)
    clean_env.setenv("LENSBUS_PUBLISHER_RULES", json.dumps([{"name": "x", "labels": []}]))
    with pytest.raises(SettingsError, match="labels"):
        load_settings(PublisherSettings)
    clean_env.setenv("LENSBUS_PUBLISHER_RULES", json.dumps([{"name": "a.b", "labels": ["x"]}]))
    with pytest.raises(SettingsError, match="rule name"):
        load_settings(PublisherSettings)
    clean_env.setenv(
        "LENSBUS_PUBLISHER_RULES",
        json.dumps([{"name": "a", "labels": ["x"], "webhook": "ftp://x/"}]),
    )
    with pytest.raises(SettingsError, match="webhook"):
        load_settings(PublisherSettings)


# ---- rules -------------------------------------------------------------------------------


def test_rule_fires_once_per_cooldown_while_label_present() -> None:
    rule = Rule(name="dog", labels=frozenset({"dog"}), min_score=0.5, cooldown_s=3.0)
    engine = RuleEngine([rule])
    fired = [
        s for s in range(12) if engine.feed(result(s, [("dog", 0.9)], t_s=s * 0.5))
    ]  # a result every 0.5 s of frame time
    assert fired == [0, 6]  # t=0 s, t=3 s (not 3.5, 4, ...)
    assert not engine.feed(result(12, [("dog", 0.4)], t_s=6.0))  # below min_score
    assert not engine.feed(result(13, [("cat", 0.9)], t_s=6.5))


def test_rule_needs_consecutive_results_and_is_per_camera() -> None:
    rule = Rule(name="dog", labels=frozenset({"dog"}), consecutive=3, cooldown_s=0)
    engine = RuleEngine([rule])
    seq = [("a", 0.9), ("a", 0.9), None, ("a", 0.9), ("a", 0.9), ("a", 0.9), ("a", 0.9)]
    fired = []
    for i, item in enumerate(seq):
        labels = [("dog", 0.9)] if item else [("cat", 0.9)]
        for f in engine.feed(result(i, labels)):
            fired.append((i, f.consecutive))
    assert fired == [(5, 3), (6, 4)]  # the streak broke at 2; cooldown 0 fires every time
    # Another camera keeps its own streak.
    assert not engine.feed(result(0, [("dog", 0.9)], camera="other"))


def test_rule_camera_filter_and_best_match() -> None:
    rule = Rule(name="r", labels=frozenset({"dog", "cat"}), cameras=frozenset({"yard"}))
    engine = RuleEngine([rule])
    assert not engine.feed(result(0, [("dog", 0.9)], camera="door"))
    (firing,) = engine.feed(result(0, [("cat", 0.7), ("dog", 0.8), ("dog", 0.6)], camera="yard"))
    assert (firing.match.label, firing.match.score) == ("dog", 0.8)
    assert firing.match.box is not None
    # Classes and segments match too (segments by area).
    r = result(1).model_copy(
        update={
            "classes": [ClassScore(label="cat", class_id=1, score=0.95)],
            "segments": [
                Segment(
                    label="dog", class_id=2, area=0.3, box=Box.from_normalized(0, 0, 1, 1, 4, 4)
                )
            ],
        }
    )
    m = best_match(rule, r)
    assert m is not None and (m.label, m.score, m.box) == ("cat", 0.95, None)
    seg_rule = Rule(name="s", labels=frozenset({"dog"}), min_area=0.5)
    assert best_match(seg_rule, r) is None


# ---- drawing -----------------------------------------------------------------------------


def column_match(img: np.ndarray, x: int, y0: int, y1: int, color: tuple[int, int, int]) -> float:
    """Fraction of rows in [y0, y1) where a pixel within 2 px of column x has ``color``."""
    band = img[y0:y1, max(0, x - 2) : x + 3].astype(int)
    close = (np.abs(band - np.array(color)).max(axis=2) < 70).any(axis=1)
    return float(close.mean())


def test_render_draws_box_where_result_says() -> None:
    rng = np.random.default_rng(1)
    frame = (rng.random((480, 640, 3)) * 60 + 40).astype(np.uint8)  # dull noise, no palette
    jpeg = encode_jpeg(frame, 90)
    r = result(7, [("dog", 0.91)])
    det = r.detections[0]
    out = decode_jpeg(render(jpeg, r, 7).jpeg)
    assert out.shape == frame.shape
    color = color_for(det.class_id)
    thick = line_width(640, 480)
    b = det.box
    inner = (b.top + 4 * thick, b.bottom - 4 * thick)
    assert column_match(out, b.left, *inner, color) > 0.9
    assert column_match(out, b.right, *inner, color) > 0.9
    assert column_match(frame, b.left, *inner, color) < 0.05
    # Nothing drawn far from the box (left of it, above the caption).
    assert column_match(out, b.left // 2, *inner, color) < 0.05


def test_render_scales_boxes_to_the_frame_drawn_on() -> None:
    # A result for a 320x240 rendition still lands on the 640x480 frame it is drawn on.
    frame = np.full((480, 640, 3), 90, np.uint8)
    r = result(1, [("dog", 0.9)], width=320, height=240)
    out = decode_jpeg(render(encode_jpeg(frame), r, 1).jpeg)
    assert column_match(out, 160, 140, 340, color_for(0)) > 0.9  # 0.25 * 640


def test_render_mask_and_classes() -> None:
    import cv2

    frame = np.full((120, 160, 3), 100, np.uint8)
    cmap = np.zeros((30, 40), np.uint8)
    cmap[:, 20:] = 3
    ok, png = cv2.imencode(".png", cmap)
    assert ok
    r = Result(
        camera="c",
        seq=1,
        capture_ns=1,
        result_ns=2,
        width=160,
        height=120,
        model=MODEL,
        task="segmentation",
        mask_png=png.tobytes(),
        segments=[
            Segment(
                label="road", class_id=3, area=0.5, box=Box.from_normalized(0.5, 0, 1, 1, 160, 120)
            )
        ],
        classes=[ClassScore(label="scene", class_id=0, score=0.9)],
    )
    out = decode_jpeg(render(encode_jpeg(frame, 95), r, 1).jpeg)
    left, right = out[60:100, 10:60].mean(axis=(0, 1)), out[60:100, 100:150].mean(axis=(0, 1))
    assert np.abs(left - 100).max() < 12  # untouched
    expect = (np.array([100, 100, 100]) + np.array(color_for(3))) / 2
    assert np.abs(right - expect).max() < 20  # blended with the class colour


# ---- rings and signals -------------------------------------------------------------------


def frame_msg(camera: str, seq: int, t_s: float = 0.0) -> bytes:
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    return encode(
        FrameEnvelope(
            camera=camera, seq=seq, capture_ns=int(t_s * 1e9), width=8, height=8, data=jpeg
        )
    )


async def test_hub_rings_joins_and_restart(clean_env: pytest.MonkeyPatch) -> None:
    hub = Hub(load_settings(PublisherSettings, frame_ring=4, result_ring=3))
    for seq in range(10):
        hub.on_frame("cam", frame_msg("cam", seq, seq / 10))
    cam = hub.cameras["cam"]
    assert list(cam.frames) == [6, 7, 8, 9] and cam.newest is not None and cam.newest.seq == 9
    for seq in (5, 7, 6, 8):
        hub.on_result("cam", encode(result(seq, camera="cam", t_s=seq / 10)))
    assert list(cam.results) == [7, 6, 8]
    assert cam.newest_result is not None and cam.newest_result.result.seq == 8
    frame9 = cam.frames[9]
    assert cam.result_for_frame(cam.frames[7], 2.0).seq == 7
    assert cam.result_for_frame(frame9, 2.0).seq == 8
    assert cam.result_for_frame(frame9, 0.05) is None  # result 0.1 s older than frame
    # seq going back: the capture restarted; old joins are dropped.
    got = hub.on_frame("cam", frame_msg("cam", 0, 5.0))
    assert got is not None and got[1] is True
    assert list(cam.frames) == [0] and not cam.results and cam.newest_result is None
    # Mismatched camera and garbage are rejected, not raised.
    assert hub.on_frame("other", frame_msg("cam", 1)) is None
    assert hub.on_result("cam", b"\x01garbage") is None
    assert hub.rejected == 2


async def test_hub_limits_cameras(clean_env: pytest.MonkeyPatch) -> None:
    """A full table evicts its longest silent camera; one a stream holds stays; when every
    camera is held, a new one is refused."""
    hub = Hub(load_settings(PublisherSettings, max_cameras=2))
    for cam in ("a", "b", "c"):
        hub.on_frame(cam, frame_msg(cam, 0))
    assert sorted(hub.cameras) == ["b", "c"] and hub.rejected == 0
    hub.cameras["b"].viewers["device"] = 1
    hub.on_frame("d", frame_msg("d", 0))  # c is newer than b, but b is watched
    assert sorted(hub.cameras) == ["b", "d"]
    hub.cameras["d"].viewers["device"] = 1
    hub.on_frame("e", frame_msg("e", 0))
    assert sorted(hub.cameras) == ["b", "d"] and hub.rejected == 1


async def test_signal_wakes_every_waiter() -> None:
    sig = Signal()
    waiters = [asyncio.ensure_future(sig.wait(0)) for _ in range(5)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    sig.notify()
    assert await asyncio.gather(*waiters) == [1] * 5
    assert await sig.wait(0) == 1  # already newer: no wait


async def test_sse_queue_is_bounded(clean_env: pytest.MonkeyPatch) -> None:
    hub = Hub(load_settings(PublisherSettings))
    hub.on_frame("cam", frame_msg("cam", 0))
    q = hub.cameras["cam"].subscribers.add(3)
    for seq in range(10):
        hub.on_result("cam", encode(result(seq, camera="cam")))
    assert q.qsize() == 3
    items = [q.get_nowait() for _ in range(3)]
    assert [i.split(b"\n")[0] for i in items if i] == [b"id: 7", b"id: 8", b"id: 9"]


async def test_durable_set_up_loop_ends_at_once_on_stop(clean_env: pytest.MonkeyPatch) -> None:
    """With NATS away the stream set-up waits RETRY_S between tries; a stop cuts that short."""
    from types import SimpleNamespace

    from lensbus.subjects import Subjects
    from lensbus_publisher.durable import RETRY_S, Durable

    stop = asyncio.Event()
    rt = SimpleNamespace(stop=stop, bus=SimpleNamespace(connected=False), subjects=Subjects())
    durable = Durable(load_settings(PublisherSettings), rt)  # type: ignore[arg-type]
    task = asyncio.create_task(durable.run())
    await asyncio.sleep(0.05)
    assert not task.done()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop.set()
    await asyncio.wait_for(task, RETRY_S)
    assert loop.time() - t0 < 0.5 and not durable.ready.is_set()


# ---- event schema and watch --------------------------------------------------------------


def test_event_schema_round_trip() -> None:
    from lensbus.codec import decode

    ev = Event(
        rule="dog",
        camera="yard",
        label="dog",
        score=0.9,
        seq=3,
        capture_ns=5,
        event_ns=6,
        snapshot=snapshot_name("yard", 3, 5),
    )
    assert decode(encode(ev), Event) == ev
    assert ev.snapshot == "yard/5-3.jpg" and ev.snapshot_bucket == "lensbus-snapshots"


def test_parse_since() -> None:
    now = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("90s", now) == now - timedelta(seconds=90)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2024-01-01T00:00:00", now) == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_since("2024-01-01T00:00:00+01:00", now).utcoffset() == timedelta(hours=1)
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_since("ten minutes", now)
