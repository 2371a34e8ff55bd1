"""Webhooks at least once: pending deliveries kept in JetStream survive a SIGKILL of the
publisher, each delivery is signed (HMAC-SHA256 over timestamp + body, per-rule secret),
``Retry-After`` is respected, and a receiver that never answers 2xx ends in the dropped count.

Real parts: the session's nats-server, the publisher as a real process, a real HTTP receiver
(aiohttp, in the test's loop). Results are published by the test itself (the rules read
results, not frames), so no model is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import nats as nats_py
from aiohttp import web

from lensbus.codec import encode
from lensbus.natsauth import (
    DEFAULT_GROUP,
    authorization_block,
    generate_passwords,
    inference_user,
)
from lensbus.natsserver import NatsServer, free_port
from lensbus.schemas import Box, Detection, ModelRef, Result
from lensbus.subjects import Subjects

MODEL = ModelRef(name="m", version="1", framework="onnx", device="cpu")


@dataclass
class Arrival:
    mono: float
    wall: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def delivery(self) -> str:
        return self.headers.get("Lensbus-Delivery", "")

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


Answer = Callable[[Arrival, int], web.Response]  # (request, how many times this id came)


def ok(_: Arrival, __: int) -> web.Response:
    return web.Response(status=204)


class Receiver:
    """A webhook receiver on a fixed port that may come up late; it records every request and
    answers each by ``answers[path]`` (204 for a path without one)."""

    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.port = free_port()
        self.answers = answers or {}
        self.arrivals: list[Arrival] = []
        self.runner: web.AppRunner | None = None

    async def _any(self, request: web.Request) -> web.Response:
        got = Arrival(
            time.monotonic(), time.time(), request.path, dict(request.headers), await request.read()
        )
        self.arrivals.append(got)
        seen = sum(a.delivery == got.delivery for a in self.arrivals)
        return self.answers.get(request.path, ok)(got, seen)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.path == path]


def verify(secret: str, headers: dict[str, str], body: bytes, max_skew_s: float = 300) -> bool:
    """The receiver's recipe (the README's): HMAC-SHA256 with the rule's secret over
    ``<Lensbus-Timestamp>.`` + the raw body, hex, compared in constant time with the value
    after ``sha256=`` in ``Lensbus-Signature``; a timestamp older than 5 minutes is refused."""
    timestamp = headers.get("Lensbus-Timestamp", "")
    signature = headers.get("Lensbus-Signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_skew_s:
        return False
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(signature, "sha256=" + mac.hexdigest())


def dog_result(camera: str, seq: int) -> Result:
    capture_ns = time.time_ns()
    return Result(
        camera=camera,
        seq=seq,
        capture_ns=capture_ns,
        result_ns=capture_ns + 1_000_000,
        width=640,
        height=480,
        model=MODEL,
        task="detection",
        detections=[
            Detection(
                label="dog",
                class_id=16,
                score=0.9,
                box=Box.from_normalized(0.25, 0.25, 0.75, 0.75, 640, 480),
            )
        ],
    )


async def send_results(
    url: str, camera: str, seqs: range, user: str | None = None, password: str | None = None
) -> None:
    nc = await nats_py.connect(url, user=user, password=password)
    try:
        for seq in seqs:
            await nc.publish(Subjects().results(camera), encode(dog_result(camera, seq)))
        await nc.flush()
    finally:
        await nc.close()


def rule(name: str, camera: str, url: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "labels": ["dog"],
        "cooldown_s": 0,
        "cameras": [camera],
        "webhook": url,
        **more,
    }


def start_publisher(start_service: Any, url: str, rules: list[dict[str, Any]], **more: Any) -> Any:
    pub = start_service("publisher", url, rules=json.dumps(rules), **more)
    pub.wait_healthy(30)
    return pub


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


def metric(pub: Any, name: str, labels: str = "") -> float:
    return float(pub.metric(f"lensbus_publisher_webhook_{name}", labels))


# ---- (1) pending deliveries survive a SIGKILL of the publisher -------------------------------


async def test_deliveries_survive_a_publisher_sigkill(nats: NatsServer, start_service) -> None:
    hooks = Receiver()  # down: its port is free, nothing listens
    n = 6
    pub = start_publisher(
        start_service,
        nats.url,
        [rule("wh-restart", "wh-restart", hooks.url("/hook"))],
        webhook_backoff_s=0.2,
        webhook_backoff_max_s=1.0,
        webhook_retries=1000,
    )
    await send_results(nats.url, "wh-restart", range(1, n + 1))
    # Every event was tried once (so it was raised and is pending), none delivered.
    await until(lambda: metric(pub, "attempts_total", 'result="error"') >= n, 30, "n attempts")
    assert metric(pub, "pending", 'rule="wh-restart"') == n
    pub.kill()
    pub.start()
    pub.wait_healthy(30)
    await hooks.start()
    try:
        await until(
            lambda: {a.event["seq"] for a in hooks.arrivals} == set(range(1, n + 1)),
            60,
            "every event delivered after the restart",
        )
        await until(lambda: metric(pub, "pending", 'rule="wh-restart"') == 0, 20, "pending 0")
    finally:
        await hooks.stop()
    # At least once: a duplicate carries the id of its first try, so receivers can drop it.
    ids: dict[int, set[str]] = defaultdict(set)
    for a in hooks.arrivals:
        ids[a.event["seq"]].add(a.delivery)
    assert all(len(v) == 1 and "" not in v for v in ids.values()), ids
    assert len({a.delivery for a in hooks.arrivals}) == n
    assert metric(pub, "deliveries_total", 'outcome="delivered"') >= n
    assert pub.stop() == 0


# ---- (2) signatures ---------------------------------------------------------------------------


async def test_deliveries_are_signed_with_the_rules_secret(nats: NatsServer, start_service) -> None:
    hooks = await Receiver().start()
    secret = "wh-sign-secret-0123456789"
    try:
        pub = start_publisher(
            start_service,
            nats.url,
            [
                rule("wh-signed", "wh-sign", hooks.url("/signed"), webhook_secret=secret),
                rule("wh-unsigned", "wh-sign", hooks.url("/unsigned")),
            ],
        )
        await send_results(nats.url, "wh-sign", range(1, 4))
        await until(
            lambda: len(hooks.on("/signed")) == 3 and len(hooks.on("/unsigned")) == 3,
            30,
            "3 deliveries to each rule",
        )
    finally:
        await hooks.stop()
    for a in hooks.on("/signed"):
        assert verify(secret, a.headers, a.body), a.headers
        assert not verify("a-wrong-secret", a.headers, a.body)
        assert not verify(secret, a.headers, a.body.replace(b'"dog"', b'"cat"'))
        assert a.event["rule"] == "wh-signed" and a.delivery
    for a in hooks.on("/unsigned"):
        assert "Lensbus-Signature" not in a.headers and a.delivery
    assert len({a.delivery for a in hooks.arrivals}) == 6
    log = pub.log
    assert secret not in log
    # The rule without a secret is named once, at start; not on each delivery.
    assert log.count("rule wh-unsigned: no webhook_secret") == 1, log
    assert pub.stop() == 0


# ---- (3) Retry-After --------------------------------------------------------------------------


async def test_retry_after_is_respected_on_429_and_503(nats: NatsServer, start_service) -> None:
    not_before: list[float] = []  # the wall time the HTTP-date form asked for

    def answer(_: Arrival, seen: int) -> web.Response:
        if seen == 1:
            return web.Response(status=429, headers={"Retry-After": "2"})
        if seen == 2:
            date = formatdate(time.time() + 3, usegmt=True)
            not_before.append(parsedate_to_datetime(date).timestamp())
            return web.Response(status=503, headers={"Retry-After": date})
        return web.Response(status=204)

    hooks = await Receiver({"/slow": answer}).start()
    try:
        pub = start_publisher(
            start_service,
            nats.url,
            [rule("wh-slow", "wh-slow", hooks.url("/slow"))],
            webhook_backoff_s=0.1,  # without the header a retry would come after ~0.1 s
        )
        await send_results(nats.url, "wh-slow", range(1, 2))
        await until(lambda: len(hooks.arrivals) >= 3, 30, "three tries")
    finally:
        await hooks.stop()
    first, second, third = hooks.arrivals[:3]
    assert first.delivery == second.delivery == third.delivery
    assert second.mono - first.mono >= 2.0, second.mono - first.mono
    assert third.wall >= not_before[0], (third.wall, not_before)
    assert metric(pub, "retries_total") == 2
    await until(
        lambda: metric(pub, "deliveries_total", 'outcome="delivered"') == 1, 10, "delivered"
    )
    assert pub.stop() == 0


# ---- (4) a receiver that never takes them ----------------------------------------------------


async def test_a_failing_receiver_ends_in_the_dropped_count(
    nats: NatsServer, start_service
) -> None:
    hooks = await Receiver(
        {
            "/fail": lambda _, __: web.Response(status=500, text="broken"),
            "/bad": lambda _, __: web.Response(status=400, text="no such thing"),
        }
    ).start()
    try:
        pub = start_publisher(
            start_service,
            nats.url,
            [
                rule("wh-fail", "wh-fail", hooks.url("/fail")),
                rule("wh-bad", "wh-fail", hooks.url("/bad")),
            ],
            webhook_retries=2,
            webhook_backoff_s=0.1,
            webhook_backoff_max_s=0.5,
        )
        await send_results(nats.url, "wh-fail", range(1, 3))
        await until(
            lambda: (
                metric(pub, "dropped_total", 'reason="max_deliveries"') == 2
                and metric(pub, "dropped_total", 'reason="rejected"') == 2
            ),
            30,
            "both rules' deliveries dropped",
        )
    finally:
        await hooks.stop()
    # 1 + 2 retries for a 5xx, one try for a 4xx other than 408/429 (the request is wrong).
    per_id: dict[str, int] = defaultdict(int)
    for a in hooks.on("/fail"):
        per_id[a.delivery] += 1
    assert sorted(per_id.values()) == [3, 3], per_id
    assert len(hooks.on("/bad")) == 2
    assert metric(pub, "deliveries_total", 'outcome="dropped"') == 4
    assert metric(pub, "deliveries_total", 'outcome="delivered"') == 0
    await until(lambda: metric(pub, "pending", 'rule="wh-fail"') == 0, 10, "nothing pending")
    assert pub.stop() == 0


# ---- (5) the publisher's own NATS user may do all of it --------------------------------------


async def test_the_publisher_user_may_keep_and_deliver_webhooks(
    tmp_path: Path, start_service
) -> None:
    passwords = generate_passwords()
    server = NatsServer(
        tmp_path / "nats", extra_config=authorization_block(passwords), log_file=tmp_path / "n.log"
    ).start()
    hooks = await Receiver().start()
    try:
        pub = start_publisher(
            start_service,
            server.url,
            [rule("wh-auth", "wh-auth", hooks.url("/hook"), webhook_secret="k")],
            nats_user="publisher",
            nats_password=passwords["publisher"],
        )
        user = inference_user(DEFAULT_GROUP)  # results come from inference
        await send_results(server.url, "wh-auth", range(1, 3), user, passwords[user])
        await until(lambda: len(hooks.arrivals) >= 2, 30, "2 deliveries")
        await until(lambda: metric(pub, "pending", 'rule="wh-auth"') == 0, 10, "acked")
        assert pub.stop() == 0
    finally:
        await hooks.stop()
        server.stop()
    assert all(verify("k", a.headers, a.body) for a in hooks.arrivals)
    log = (tmp_path / "n.log").read_text(errors="replace")
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]


# ---- the headers and the timing, without processes ----------------------------------------


def test_signature_headers_follow_the_documented_recipe() -> None:
    from lensbus_publisher.signing import delivery_headers

    body = b'{"rule":"r","camera":"c"}'
    signed = delivery_headers("d1", 2, body, "k3y")
    assert signed["Lensbus-Delivery"] == "d1" and signed["Lensbus-Attempt"] == "2"
    assert verify("k3y", signed, body) and not verify("other", signed, body)
    stale = delivery_headers("d1", 1, body, "k3y", now=time.time() - 301)
    assert not verify("k3y", stale, body)  # a replay older than 5 minutes
    assert "Lensbus-Signature" not in delivery_headers("d1", 1, body, None)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from lensbus_publisher.signing import RETRY_AFTER_MAX_S, retry_after

    now = 1_800_000_000.0
    assert retry_after("7", now) == 7.0
    assert retry_after(" 0 ", now) == 0.0
    assert retry_after(formatdate(now + 12, usegmt=True), now) == 12.0
    assert retry_after(formatdate(now - 30, usegmt=True), now) == 0.0  # already past
    assert retry_after("99999999", now) == RETRY_AFTER_MAX_S
    for bad in (None, "", "soon", "-3", "1.5", "Mon, 99 Foo 2025 25:61:00"):
        assert retry_after(bad, now) is None, bad


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    from lensbus_publisher.signing import backoff

    lows = [backoff(n, 0.5, 30.0, rand=lambda: 0.0) for n in range(1, 10)]
    highs = [backoff(n, 0.5, 30.0, rand=lambda: 1.0) for n in range(1, 10)]
    assert highs[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and highs[8] == 30.0
    assert lows == [h / 2 for h in highs]
    assert backoff(10_000, 0.5, 30.0) <= 30.0  # no overflow however many tries
