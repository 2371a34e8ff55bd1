"""Hostile projects against the real projects service on a nats-server WITH auth (each service
its own user, the projects' users through the auth callout the projects service answers),
all running at once beside a calm witness project:

(a) a handler that raises on every call: counted, its process not restarted, still receiving;
(b) one that sleeps 10 s with deadline_s 2: killed and restarted, counted ``hang``;
(c) one that allocates without bound with memory_mb 256: contained (a MemoryError counted, or
    its process restarted), the service and the others fine;
(d) one that publishes on ``<p>.results.cam1`` with its own credentials: NATS denies it (a
    subscriber there gets nothing from it), the project keeps running;
(e) one that opens another project's state bucket: denied.

And a process that exits or freezes (its beats stop) is restarted, counted ``exit`` and
``silent``. Meanwhile the witness handles every result (nothing lost) and the service stays
healthy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from test_projects_service import (
    ECHO,
    INSTANCE,
    Seen,
    deploy,
    report,
    result,
    wait_metric,
    write_project,
)

from lensbus import Subjects, encode, natsauth
from lensbus.bus import connect
from lensbus.natsserver import NatsServer
from lensbus.subjects import project_state_bucket

pytestmark = pytest.mark.slow

S = Subjects()

RAISES = """
def on_result(result, ctx):
    raise ValueError("bad input " + str(result.seq % 2))
"""
SLEEPS = """
import time

def on_result(result, ctx):
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version})
    time.sleep(10)
"""
HOGS = """
def on_result(result, ctx):
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version})
    hoard = []
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))
"""
EXITS = """
import os

def on_result(result, ctx):
    os._exit(3)
"""
# The whole process frozen: its beats stop too.
FREEZES = """
import os, signal

def on_result(result, ctx):
    os.kill(os.getpid(), signal.SIGSTOP)
"""
# Its own connection, with the credentials its process was given: what a hostile project
# could do besides ctx.
OWN_CONNECTION = """
import os
from lensbus.bus import connect

_nc = None

async def nc():
    global _nc
    if _nc is None:
        _nc = await connect(
            os.environ["LENSBUS_PROJECT_NATS_URL"],
            name="sneaky",
            user=os.environ["LENSBUS_PROJECT_USER"],
            password=os.environ["LENSBUS_PROJECT_PASSWORD"],
            error_cb=_ignore,  # the server's permission errors: what it tries anyway
        )
    return _nc

async def _ignore(exc):
    pass
"""
PUBLISHES_RESULTS = (
    OWN_CONNECTION
    + """
async def on_result(result, ctx):
    conn = await nc()
    await conn.publish("lensbus.results.cam1", b"forged")
    await conn.flush()
    ctx.publish("seen", {"seq": result.seq, "v": ctx.version})
"""
)
READS_OTHERS_STATE = (
    OWN_CONNECTION
    + """
async def on_result(result, ctx):
    conn = await nc()
    try:
        kv = await conn.jetstream(timeout=2).key_value("lensbus-project-calm")
        entry = await kv.get("secret")
        outcome = {"denied": False, "got": repr(entry.value)}
    except Exception as exc:
        outcome = {"denied": True, "error": type(exc).__name__}
    ctx.state.set("mine", result.seq)  # its own bucket is fine
    ctx.publish("snoop", {"seq": result.seq, "v": ctx.version, **outcome})
"""
)
PROJECTS = {
    "calm": (ECHO, {}),
    "raiser": (RAISES, {}),
    "sleeper": (SLEEPS, {"deadline_s": 2.0}),
    "hog": (HOGS, {"memory_mb": 256}),
    "sneaky": (PUBLISHES_RESULTS, {}),
    "snoop": (READS_OTHERS_STATE, {}),
    "quitter": (EXITS, {}),
    "frozen": (FREEZES, {"deadline_s": 2.0}),
}
RESULTS = 150  # at 10/s, at least: more while the restarts are awaited


class Secured:
    def __init__(self, server: NatsServer, passwords: dict[str, str], seed: str) -> None:
        self.server, self.passwords, self.seed = server, passwords, seed
        self.conns: list[Client] = []

    def creds(self, user: str) -> dict[str, str]:
        return {"nats_user": user, "nats_password": self.passwords[user]}

    async def connect(self, user: str) -> Client:
        nc = await connect(
            self.server.url, name=f"test-{user}", user=user, password=self.passwords[user]
        )
        self.conns.append(nc)
        return nc


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    """A nats-server as lensbus up runs it: a user per service, the projects' users through
    the auth callout."""
    callout = natsauth.generate_callout_secrets()
    passwords = natsauth.generate_passwords()
    config = natsauth.authorization_block(passwords, callout=callout["issuer"])
    server = NatsServer(tmp_path / "nats", extra_config=config, log_file=tmp_path / "nats.log")
    server.start()
    sec = Secured(server, passwords, callout["seed"])
    yield sec
    for nc in sec.conns:
        if not nc.is_closed:
            await nc.close()
    server.stop()


async def test_hostile_projects_are_contained(
    secured: Secured, start_service: Any, tmp_path: Path
) -> None:
    svc = start_service(
        "projects",
        secured.server.url,
        instance=INSTANCE,
        cache_dir=tmp_path / "cache",
        report_s=0.5,
        restart_backoff_s=0.2,
        callout_seed=secured.seed,
        **secured.creds("projects"),
    )
    svc.wait_healthy(30)
    deployer = await secured.connect("deployer")  # stands in for the deployer: its writes
    inference = await secured.connect("inference")  # publishes the results
    client = await secured.connect("client")  # watches
    seen = {name: Seen() for name in PROJECTS}
    for name, s in seen.items():
        await client.subscribe(S.project_output(name, "cam1", "seen"), cb=s.cb)
    snooped = Seen()
    await client.subscribe(S.project_output("snoop", "cam1", "snoop"), cb=snooped.cb)
    forged: list[bytes] = []

    async def on_results(msg: Msg) -> None:
        if msg.data == b"forged":
            forged.append(msg.data)

    await client.subscribe(S.results("cam1"), cb=on_results)

    for name, (handler, limits) in PROJECTS.items():
        folder = write_project(tmp_path, name, "1", handler)
        manifest = json.loads((folder / "project.json").read_text())
        manifest["limits"].update(limits)
        (folder / "project.json").write_text(json.dumps(manifest))
        await deploy(deployer, folder, name, "1")
    for name in PROJECTS:
        await wait_running(deployer, name)

    feeder = Feeder(inference)
    await feeder.until(RESULTS)
    # `lensbus project run` connects as a project before it is deployed: its password (an
    # HMAC only the seed's holders can make) is enough.
    dev = await nats_py.connect(
        secured.server.url,
        user=natsauth.project_user("not-deployed"),
        password=natsauth.project_password(secured.seed, "not-deployed"),
        allow_reconnect=False,
        connect_timeout=10,
    )
    await dev.publish(S.project_output("not-deployed", "cam1", "hello"), b"")
    await dev.flush()
    await dev.close()
    try:
        await check_restarted(svc, seen)
    finally:
        published = await feeder.stop()
    await check_contained(svc, deployer, seen, snooped, forged, published)
    # NATS itself refused both, each as the project's own user.
    log = (tmp_path / "nats.log").read_text(errors="replace")
    assert '"$G/user:project-sneaky" - Publish Violation - Subject "lensbus.results.cam1"' in log
    assert '"$G/user:project-snoop" - Publish Violation' in log
    assert f"KV_{project_state_bucket('calm')}" in log


async def wait_running(nc: Client, name: str, within_s: float = 40.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        rep = await report(nc, name)
        if rep is not None and rep.state == "running":
            return
        assert rep is None or rep.state != "failed", f"{name} failed: {rep.reason}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} not running in {within_s} s: {await report(nc, name)}")


class Feeder:
    """Results for cam1 at 10/s, from seq 1, until stopped: restarts need results to happen
    on (a busy 2-core box restarts a project in seconds, not in a fixed number of results)."""

    def __init__(self, nc: Client) -> None:
        self.nc, self.published = nc, 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.published += 1
            await self.nc.publish(S.results("cam1"), encode(result("cam1", self.published)))
            await asyncio.sleep(0.1)

    async def until(self, n: int) -> None:
        while self.published < n:
            await asyncio.sleep(0.1)

    async def stop(self) -> int:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.nc.flush()
        return self.published


async def check_restarted(svc: Any, seen: dict[str, Seen]) -> None:
    """Each misbehaving process was restarted, counted by cause, and handles results again."""
    # (b) killed and restarted, counted as a hang, twice: handled again after a restart.
    hang = 'project="sleeper",reason="hang"'
    assert await wait_metric(svc, "lensbus_project_restarts_total", hang, 2) >= 2
    assert len(seen["sleeper"].seqs()) >= 2

    # A process that exits, or freezes (no beats), is restarted, counted by cause.
    exited = 'project="quitter",reason="exit"'
    assert await wait_metric(svc, "lensbus_project_restarts_total", exited, 1) >= 1
    silent = 'project="frozen",reason="silent"'
    assert await wait_metric(svc, "lensbus_project_restarts_total", silent, 1) >= 1


async def check_contained(
    svc: Any,
    nc: Client,
    seen: dict[str, Seen],
    snooped: Seen,
    forged: list[bytes],
    published: int,
) -> None:
    # The witness handled every result: nothing the others did cost it one.
    await seen["calm"].wait(lambda: len(seen["calm"].seqs()) >= published)
    assert sorted(seen["calm"].seqs()) == list(range(1, published + 1))
    assert svc.healthy()

    # (a) counted, never restarted, still receiving.
    raiser = await report(nc, "raiser")
    assert raiser is not None and raiser.state == "running"
    assert raiser.errors >= RESULTS // 2 and raiser.restarts == 0, raiser
    assert await wait_metric(svc, "lensbus_project_handler_errors_total", 'project="raiser"', 75)

    # (c) contained: a MemoryError counted, or the process restarted.
    hog = await report(nc, "hog")
    assert hog is not None and (hog.errors + hog.restarts) >= 1, hog
    assert len(seen["hog"].seqs()) >= 2

    # (d) denied by NATS, and it keeps running.
    assert forged == []
    assert len(seen["sneaky"].seqs()) >= RESULTS // 2
    sneaky = await report(nc, "sneaky")
    assert sneaky is not None and sneaky.state == "running" and sneaky.restarts == 0

    # (e) denied; its own state bucket works.
    assert snooped.messages and all(m.payload["denied"] for m in snooped.messages)
    assert snooped.messages[-1].payload["error"], "the error it got"
    assert svc.metric("lensbus_project_auth_total", 'outcome="allowed"') >= len(seen)
    assert svc.stop() == 0
