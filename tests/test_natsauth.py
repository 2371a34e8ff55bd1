"""NATS users and permissions (lensbus.natsauth) on a real nats-server.

Every service runs with its own user and must fully work (capture -> inference with the real
YOLOv3-tiny from the deployer -> results, events and snapshots from the publisher, replay of
the results stream by a program); what a user is not allowed to do must be refused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.js import api
from nats.js.errors import KeyNotFoundError
from photos import photos

from lensbus import DecodeError, Subjects, decode
from lensbus.bus import connect as bus_connect
from lensbus.cameras import CamerasBucket
from lensbus.cli.compose_setup import compose_config
from lensbus.deployclient import DeployClient
from lensbus.natsauth import (
    CALLOUT_ISSUER_ENV,
    PASSWORD_PATTERN,
    USERS,
    authorization_block,
    env_var,
    generate_callout_secrets,
    generate_nkey,
    generate_passwords,
    inference_user,
    nkey_env_var,
    nkey_users,
    permissions,
    project_authorizer,
    project_password,
    project_user,
    public_nkey,
)
from lensbus.natscallout import CalloutService
from lensbus.natsmqtt import MQTT_USER
from lensbus.natsprojects import PROJECTS_USER
from lensbus.natsserver import NatsServer
from lensbus.schemas import Event, Result, Status
from lensbus.schemas.camera import CameraConfig, CameraState, camera_key, state_key
from lensbus.schemas.deploy import group_key, report_key
from lensbus.schemas.project import project_key, project_object_name, project_report_key
from lensbus.subjects import (
    CAMERAS_BUCKET,
    CLIPS_BUCKET,
    DEPLOYMENTS_BUCKET,
    MODELS_BUCKET,
    PROJECTS_BUCKET,
    RESULTS_STREAM,
    SNAPSHOTS_BUCKET,
    project_state_bucket,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_NATS_CONF = ROOT / "deploy" / "nats" / "nats-server.conf"
YOLO = "yolov3-tiny-onnx"
AUTH_GROUP = "authgroup"  # served by the user inference-authgroup

# ---- the permission set itself ---------------------------------------------------------------


def test_committed_compose_config_is_generated_from_the_code() -> None:
    assert COMPOSE_NATS_CONF.read_text() == compose_config(), (
        "deploy/nats/nats-server.conf differs from lensbus.natsauth: regenerate it with "
        "`python -m lensbus.natsauth compose-config > deploy/nats/nats-server.conf`"
    )


def test_every_user_has_publish_and_subscribe_allow_lists() -> None:
    for user in USERS:
        perms = permissions(user)
        assert perms["publish"]["allow"] and perms["subscribe"]["allow"], user
        for subject in perms["publish"]["allow"] + perms["subscribe"]["allow"]:
            assert " " not in subject and subject == subject.strip(), subject
    with pytest.raises(ValueError, match="unknown lensbus NATS user"):
        permissions("intruder")


def test_permissions_follow_the_prefix() -> None:
    perms = permissions("capture", "site1.lensbus")
    assert "site1.lensbus.frames.*" in perms["publish"]["allow"]
    assert not any(s.startswith("lensbus.") for s in perms["publish"]["allow"])


def test_generated_passwords_are_fresh_and_config_safe() -> None:
    a, b = generate_passwords(), generate_passwords()
    assert set(a) == set(USERS) and all(a[u] != b[u] for u in USERS)
    assert all(PASSWORD_PATTERN.fullmatch(p) for p in a.values())
    with pytest.raises(ValueError, match="no nkey or password"):
        authorization_block({"capture": "x"})


# ---- a real server with the users ------------------------------------------------------------


class AuthServer:
    def __init__(self, server: NatsServer, passwords: dict[str, str]) -> None:
        self.server = server
        self.passwords = passwords
        self.log_path = server.log_file
        self.conns: list[nats_py.NATS] = []

    @property
    def url(self) -> str:
        return self.server.url

    def creds(self, user: str) -> dict[str, str]:
        """Settings that make a service connect as ``user``."""
        return {"nats_user": user, "nats_password": self.passwords[user]}

    def violations(self) -> list[str]:
        assert self.log_path is not None
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if "Violation" in line]

    async def connect(self, user: str, errors: list[str] | None = None) -> nats_py.NATS:
        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        # lensbus's own connect: it passes the user's inbox prefix, the only inbox allowed.
        nc = await bus_connect(
            self.url,
            name=f"test-{user}",
            reconnect=False,
            user=user,
            password=self.passwords[user],
            error_cb=on_error,
        )
        self.conns.append(nc)
        return nc


@pytest.fixture
async def auth_nats(tmp_path: Path) -> AsyncIterator[AuthServer]:
    passwords = generate_passwords([AUTH_GROUP])
    server = NatsServer(
        tmp_path / "nats",
        extra_config=authorization_block(passwords),
        log_file=tmp_path / "nats.log",
    ).start()
    auth = AuthServer(server, passwords)
    yield auth
    for nc in auth.conns:
        if not nc.is_closed:
            await nc.close()
    server.stop()


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def denied(errors: list[str], verb: str, subject: str) -> bool:
    want = f'permissions violation for {verb} to "{subject}"'.lower()
    return any(want in e.lower() for e in errors)


def test_wrong_password_is_refused(auth_nats: AuthServer) -> None:
    # A raw connection: nats-py leaves a socket open after a refused CONNECT.
    with socket.create_connection((auth_nats.server.host, auth_nats.server.port), 5) as sock:
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"INFO ")
        creds = {"user": "capture", "pass": "wrong", "verbose": False, "pedantic": False}
        sock.sendall(f"CONNECT {json.dumps(creds)}\r\nPING\r\n".encode())
        reply = sock.recv(4096)
    assert b"-ERR 'Authorization Violation'" in reply, reply


async def _buckets(auth: AuthServer) -> None:
    """The deployments bucket and the model store, made by the deployer's user."""
    js = (await auth.connect("deployer")).jetstream()
    await js.create_key_value(api.KeyValueConfig(bucket=DEPLOYMENTS_BUCKET, history=5))
    await js.create_object_store(MODELS_BUCKET)


async def test_capture_cannot_publish_results_or_write_deployments(auth_nats: AuthServer) -> None:
    await _buckets(auth_nats)
    s = Subjects()
    seen: list[bytes] = []

    async def on_result(msg: Any) -> None:
        seen.append(msg.data)

    watcher = await auth_nats.connect("client")
    await watcher.subscribe(s.results("cam1"), cb=on_result)
    await watcher.flush()

    errors: list[str] = []
    cap = await auth_nats.connect("capture", errors)
    await cap.publish(s.frames("cam1"), b"allowed")  # its own subject: no error
    await cap.publish(s.results("cam1"), b"forged result")
    await cap.flush()
    with pytest.raises(Exception):  # noqa: B017 - the server drops it: no ack, a timeout
        await cap.jetstream().publish(f"$KV.{DEPLOYMENTS_BUCKET}.group.x", b"forged", timeout=1)
    with pytest.raises(Exception):  # noqa: B017 - the JetStream API is not its to call
        kv = await cap.jetstream(timeout=1).key_value(DEPLOYMENTS_BUCKET)
        await kv.put("group.x", b"forged")
    await until(lambda: denied(errors, "Publish", s.results("cam1")), 5, "the results denial")
    assert denied(errors, "Publish", f"$KV.{DEPLOYMENTS_BUCKET}.group.x"), errors
    assert not denied(errors, "Publish", s.frames("cam1")), errors
    kv = await (await auth_nats.connect("deployer")).jetstream().key_value(DEPLOYMENTS_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await kv.get("group.x")
    await watcher.flush()
    await asyncio.sleep(0.2)
    assert seen == []


async def test_inference_writes_its_reports_but_never_group_keys(auth_nats: AuthServer) -> None:
    await _buckets(auth_nats)
    errors: list[str] = []
    js = (await auth_nats.connect("inference", errors)).jetstream()
    kv = await js.key_value(DEPLOYMENTS_BUCKET)  # it may read the bucket
    await kv.put(report_key("default", "inst1"), b"my report")  # the user's group: default
    assert (await kv.get(report_key("default", "inst1"))).value == b"my report"
    with pytest.raises(Exception):  # noqa: B017 - no ack comes for a denied publish
        await js.publish(f"$KV.{DEPLOYMENTS_BUCKET}.{group_key('g')}", b"forged", timeout=1)
    with pytest.raises(Exception):  # noqa: B017
        await js.publish(f"$O.{MODELS_BUCKET}.M.forged", b"{}", timeout=1)
    assert denied(errors, "Publish", f"$KV.{DEPLOYMENTS_BUCKET}.group.g"), errors
    assert denied(errors, "Publish", f"$O.{MODELS_BUCKET}.M.forged"), errors
    with pytest.raises(KeyNotFoundError):
        await kv.get(group_key("g"))


# What each user must not do: (user, subject it publishes to).
FORBIDDEN_PUBLISH = [
    ("capture", "lensbus.events.cam1"),
    ("capture", "lensbus.status.deployer.fake"),
    ("capture", "lensbus.api.deployer.activate"),
    ("capture", f"$O.{MODELS_BUCKET}.M.x"),
    ("capture", f"$JS.API.STREAM.DELETE.KV_{DEPLOYMENTS_BUCKET}"),
    ("capture", f"$JS.API.STREAM.DELETE.KV_{CAMERAS_BUCKET}"),
    ("capture", f"$JS.API.STREAM.PURGE.KV_{CAMERAS_BUCKET}"),
    ("capture", f"$JS.API.STREAM.UPDATE.KV_{CAMERAS_BUCKET}"),
    ("capture", f"$KV.{CAMERAS_BUCKET}.camera.cam1"),
    ("capture", f"$O.{CLIPS_BUCKET}.C.x"),
    ("inference", "lensbus.frames.cam1"),
    ("inference", "lensbus.model-frames.cam1"),
    ("inference", "lensbus.events.cam1"),
    ("inference", f"$JS.API.STREAM.PURGE.OBJ_{MODELS_BUCKET}"),
    ("inference", f"$JS.API.STREAM.DELETE.KV_{DEPLOYMENTS_BUCKET}"),
    ("publisher", "lensbus.results.cam1"),
    ("publisher", "lensbus.frames.cam1"),
    ("publisher", f"$KV.{DEPLOYMENTS_BUCKET}.group.x"),
    ("publisher", f"$O.{MODELS_BUCKET}.C.x"),
    ("deployer", "lensbus.results.cam1"),
    ("deployer", "lensbus.frames.cam1"),
    ("deployer", f"$JS.API.STREAM.DELETE.OBJ_{MODELS_BUCKET}"),
    ("client", "lensbus.frames.cam1"),
    ("client", "lensbus.results.cam1"),
    ("client", "lensbus.events.cam1"),
    ("client", "lensbus.status.inference.fake"),
    ("client", f"$KV.{DEPLOYMENTS_BUCKET}.group.x"),
    ("client", f"$O.{MODELS_BUCKET}.C.x"),
    ("client", f"$O.{SNAPSHOTS_BUCKET}.C.x"),
    ("client", f"$JS.API.STREAM.PURGE.{RESULTS_STREAM}"),
    ("client", f"$JS.API.STREAM.DELETE.{RESULTS_STREAM}"),
    ("client", f"$JS.API.STREAM.CREATE.{RESULTS_STREAM}"),
    ("client", f"$KV.{CAMERAS_BUCKET}.state.cam1"),
    ("client", f"$JS.API.STREAM.DELETE.KV_{CAMERAS_BUCKET}"),
    ("client", f"$JS.API.STREAM.PURGE.KV_{CAMERAS_BUCKET}"),
    ("client", f"$O.{CLIPS_BUCKET}.C.x"),
    ("client", f"$JS.API.STREAM.PURGE.OBJ_{CLIPS_BUCKET}"),
    ("publisher", f"$KV.{CAMERAS_BUCKET}.camera.cam1"),
    ("publisher", f"$KV.{CAMERAS_BUCKET}.state.cam1"),
    ("publisher", f"$JS.API.STREAM.CREATE.KV_{CAMERAS_BUCKET}"),
    ("inference", f"$KV.{CAMERAS_BUCKET}.camera.cam1"),
    ("inference", f"$O.{CLIPS_BUCKET}.C.x"),
    # finding 4 of issue 13: the client is read-only; inference reports only for its group
    ("client", "lensbus.api.deployer.activate"),
    ("client", "lensbus.api.deployer.rollback"),
    ("client", "lensbus.api.deployer.upload_begin"),
    ("client", f"$KV.{CAMERAS_BUCKET}.camera.cam1"),
    ("client", f"$JS.API.CONSUMER.DELETE.{RESULTS_STREAM}.someone-else"),
    ("inference", f"$KV.{DEPLOYMENTS_BUCKET}.report.other.inst1"),
    # analytics publishes tracked results and zone events, and writes no bucket
    ("analytics", "lensbus.detections.cam1"),
    ("analytics", "lensbus.frames.cam1"),
    ("analytics", f"$KV.{DEPLOYMENTS_BUCKET}.pipeline.default"),
    ("analytics", f"$JS.API.STREAM.PURGE.KV_{DEPLOYMENTS_BUCKET}"),
    # issue 16: the projects service follows releases, writes only its reports, and may
    # manage streams (the state buckets) but none of lensbus's own
    ("projects", "lensbus.results.cam1"),
    ("projects", "lensbus.events.cam1"),
    ("projects", "lensbus.projects.p.cam1.x"),
    ("projects", f"$KV.{DEPLOYMENTS_BUCKET}.project.p"),
    ("projects", f"$KV.{DEPLOYMENTS_BUCKET}.group.x"),
    ("projects", f"$O.{PROJECTS_BUCKET}.M.x"),
    ("projects", f"$O.{MODELS_BUCKET}.C.x"),
    ("projects", f"$JS.API.STREAM.DELETE.KV_{DEPLOYMENTS_BUCKET}"),
    ("projects", f"$JS.API.STREAM.UPDATE.OBJ_{MODELS_BUCKET}"),
    ("projects", f"$JS.API.STREAM.PURGE.{RESULTS_STREAM}"),
    ("projects", f"$JS.API.STREAM.CREATE.OBJ_{PROJECTS_BUCKET}"),
    ("projects", "$JS.API.STREAM.DELETE.$MQTT_sess"),
    ("projects", "$SYS.REQ.USER.AUTH"),
    ("client", "lensbus.projects.p.cam1.x"),
    ("client", "lensbus.api.deployer.project_deploy"),
    ("publisher", "lensbus.projects.p.cam1._overlay"),
    ("deployer", f"$JS.API.STREAM.DELETE.OBJ_{PROJECTS_BUCKET}"),
]
# ... and what it must not subscribe to (answering the deployer's API, reading frames).
FORBIDDEN_SUBSCRIBE = [
    ("client", "lensbus.api.deployer.*"),
    ("client", f"$KV.{DEPLOYMENTS_BUCKET}.>"),
    ("capture", "lensbus.frames.*"),
    ("capture", "lensbus.results.*"),
    ("inference", "lensbus.api.deployer.*"),
    ("publisher", "lensbus.api.deployer.*"),
    ("analytics", "lensbus.frames.*"),
    ("analytics", "lensbus.api.deployer.*"),
    # every user reads only its own inbox (_INBOX_<user>)
    ("capture", "_INBOX.>"),
    ("capture", "_INBOX_client.>"),
    ("client", "_INBOX.>"),
    ("client", "_INBOX_operator.>"),
    ("inference", "_INBOX_deployer.>"),
    ("projects", "lensbus.frames.*"),
    ("projects", "lensbus.projects.>"),
    ("publisher", "lensbus.projects.>"),
    ("capture", "lensbus.projects.>"),
]


async def test_forbidden_subjects_are_denied(auth_nats: AuthServer) -> None:
    for user in USERS:
        errors: list[str] = []
        nc = await auth_nats.connect(user, errors)
        pubs = [s for u, s in FORBIDDEN_PUBLISH if u == user]
        subs = [s for u, s in FORBIDDEN_SUBSCRIBE if u == user]
        for subject in pubs:
            await nc.publish(subject, b"x")
        for subject in subs:
            await nc.subscribe(subject)
        await nc.flush()
        deadline = time.monotonic() + 5
        while not (
            all(denied(errors, "Publish", x) for x in pubs)
            and all(denied(errors, "Subscription", x) for x in subs)
        ):
            assert time.monotonic() < deadline, f"not every denial of {user}: got {errors}"
            await asyncio.sleep(0.05)


async def test_env_referenced_nkeys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose config's $LENSBUS_NATS_<USER>_NKEY references (public keys), MQTT's
    $LENSBUS_NATS_MQTT_PASSWORD and the callout's issuer ($LENSBUS_NATS_CALLOUT_ISSUER),
    resolved from the environment nats-server runs in (auth_users too)."""
    seeds = {user: generate_nkey() for user in nkey_users()}
    for user, seed in seeds.items():
        monkeypatch.setenv(nkey_env_var(user), public_nkey(seed))
    mqtt = generate_passwords()[MQTT_USER]
    monkeypatch.setenv(env_var(MQTT_USER), mqtt)
    callout = generate_callout_secrets()
    monkeypatch.setenv(CALLOUT_ISSUER_ENV, callout["issuer"])
    config = authorization_block(None, callout=f"${CALLOUT_ISSUER_ENV}")
    assert "password: $LENSBUS_NATS_MQTT_PASSWORD" in config
    server = NatsServer(tmp_path / "nats", extra_config=config).start()
    try:
        for user in nkey_users():
            nc = await nats_py.connect(
                server.url, nkeys_seed_str=seeds[user], allow_reconnect=False
            )
            if user == PROJECTS_USER:  # the callout answers project users
                authorize = project_authorizer(callout["seed"])
                service = CalloutService(nc, callout["seed"], authorize)
                await service.start()
                continue
            await nc.close()
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        project = await nats_py.connect(
            server.url,
            user=project_user("p1"),
            password=project_password(callout["seed"], "p1"),
            allow_reconnect=False,
            error_cb=on_error,
        )
        # Its events only on its own subject (the publisher republishes them): it cannot
        # forge a zone event or another project's on the events subjects.
        s = Subjects()
        for subject in (s.project_event("p1", "cam1"), s.events("cam1")):  # own first
            await project.publish(subject, b"an event")
        await project.flush()
        await until(lambda: denied(errors, "Publish", s.events("cam1")), 5, "the denial")
        assert not denied(errors, "Publish", s.project_event("p1", "cam1")), errors
        await project.close()
        assert service.counts == {"allowed": 1}  # every configured user bypassed it
        await service.nc.close()
    finally:
        server.stop()


# ---- every service with its own user, end to end -----------------------------------------


class Seen:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.events: list[Event] = []
        self.status: dict[str, Status] = {}

    async def on_result(self, msg: Any) -> None:
        self.results.append(decode(msg.data, Result))

    async def on_event(self, msg: Any) -> None:
        self.events.append(decode(msg.data, Event))

    async def on_status(self, msg: Any) -> None:
        try:
            st = decode(msg.data, Status)
        except DecodeError:
            return
        self.status[st.service] = st

    def labels(self) -> set[str]:
        return {d.label for r in self.results for d in r.detections}


@pytest.mark.slow
async def test_every_service_works_with_its_own_user(
    auth_nats: AuthServer, start_service, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    if YOLO not in demo_models:
        pytest.skip(f"demo package {YOLO} not built")
    started: list[Any] = []

    def start(name: str, *args: Any, **kwargs: Any) -> Any:
        started.append(start_service(name, *args, **kwargs))
        return started[-1]

    try:
        await _end_to_end(auth_nats, start, demo_models, tmp_path)
    except AssertionError as exc:
        logs = "\n".join(f"--- {sp.name}:\n{sp.log[-3000:]}" for sp in started)
        denials = "\n".join(auth_nats.violations())
        raise AssertionError(f"{exc}\nserver denials:\n{denials}\n{logs}") from None


async def _end_to_end(
    auth: AuthServer, start_service: Any, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    s = Subjects()
    dep = start_service(
        "deployer", auth.url, work_dir=tmp_path / "deployer", **auth.creds("deployer")
    )
    dep.wait_healthy(30)
    inf = start_service(
        "inference",
        auth.url,
        group=AUTH_GROUP,
        instance="authinf",
        model_cache=tmp_path / "cache",
        stream="model",
        **auth.creds(inference_user(AUTH_GROUP)),
    )
    rules = [{"name": "dogs", "labels": ["dog"], "min_score": 0.5, "cooldown_s": 0}]
    pub = start_service("publisher", auth.url, rules=json.dumps(rules), **auth.creds("publisher"))

    seen = Seen()
    nc = await auth.connect("client")
    await nc.subscribe(s.results("authcam"), cb=seen.on_result)
    await nc.subscribe(s.events("authcam"), cb=seen.on_event)
    await nc.subscribe(s.all_status(), cb=seen.on_status)

    # The operator uploads and activates the model through the deployer; a program (the
    # read-only client) asks for the status.
    dc = DeployClient(await auth.connect("operator"), timeout=30)
    stored = await dc.upload(demo_models[YOLO])
    assert stored.model is not None
    await dc.activate(AUTH_GROUP, stored.model.name, stored.model.version)
    inf.wait_healthy(60)
    pub.wait_healthy(30)
    await until(
        lambda: (st := seen.status.get("inference")) is not None and st.model is not None,
        60,
        "inference serving the deployed model",
    )

    cap = start_service(
        "capture",
        auth.url,
        camera="authcam",
        source=photos(tmp_path),
        fps=3,
        loop="true",
        model_height=416,
        **auth.creds("capture"),
    )
    cap.wait_healthy(30)
    await until(lambda: {"dog", "person", "horse"} <= seen.labels(), 60, "real COCO labels")
    await until(lambda: any(e.snapshot for e in seen.events), 30, "an event with a snapshot")
    assert {"capture", "inference", "deployer", "publisher"} <= set(seen.status)

    # The deployer sees the swap report inference wrote (its report.> key) and the heartbeat.
    async def instance_reported() -> bool:
        groups = await DeployClient(nc, timeout=30).status(AUTH_GROUP)
        return any(i.instance == "authinf" and i.serving for g in groups for i in g.instances)

    deadline = time.monotonic() + 20
    while not await instance_reported():
        assert time.monotonic() < deadline, "the deployer never saw authinf serving"
        await asyncio.sleep(0.2)

    # A program replays the results stream (as `lensbus watch --since` does) and reads a
    # snapshot of an event.
    js = nc.jetstream()
    replayed: list[Result] = []

    async def on_replay(msg: Any) -> None:
        replayed.append(decode(msg.data, Result))

    sub = await js.subscribe(
        s.results("authcam"),
        stream=RESULTS_STREAM,
        cb=on_replay,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    await until(lambda: len(replayed) >= 3, 10, "replayed results")
    await sub.unsubscribe()
    psub = await js.pull_subscribe(
        s.events("authcam"), durable="authdurable", stream=RESULTS_STREAM
    )
    pulled = await psub.fetch(1, timeout=5)
    for msg in pulled:
        await msg.ack()
    event = next(e for e in seen.events if e.snapshot)
    snapshots = await js.object_store(SNAPSHOTS_BUCKET)
    jpeg = (await snapshots.get(event.snapshot)).data
    assert jpeg is not None and jpeg[:2] == b"\xff\xd8"

    for svc in (cap, pub, inf, dep):
        assert svc.stop() == 0, svc.log
    assert auth.violations() == [], "a service was denied something it needs"


# ---- the cameras bucket and the clips object store (issue 12) ---------------------------------


async def _denied_write(js: Any, subject: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the server drops it: no ack, a timeout
        await js.publish(subject, b"forged", timeout=1)


async def test_cameras_bucket_capture_writes_states_operator_writes_configs(
    auth_nats: AuthServer,
) -> None:
    # The operator (lensbus cameras add) comes first: it may create the bucket, add a camera.
    operator_js = (await auth_nats.connect("operator")).jetstream(timeout=2)
    await (await CamerasBucket.open(operator_js)).add(CameraConfig(id="cam1", source="test"))
    client_errors: list[str] = []
    client_js = (await auth_nats.connect("client", client_errors)).jetstream(timeout=2)
    client = await CamerasBucket.open(client_js, create=False)

    # Capture binds it, reads the configs, writes (and clears) its states; no config.
    cap_errors: list[str] = []
    cap_js = (await auth_nats.connect("capture", cap_errors)).jetstream(timeout=2)
    cap = await CamerasBucket.open(cap_js)
    assert set((await cap.view()).configs) == {"cam1"}
    async for watched in cap.views(asyncio.Event(), states=False):  # capture's own watch
        assert set(watched.configs) == {"cam1"} and watched.states == {}
        break
    state = CameraState(camera="cam1", state="running", instance="cap1", since_ns=1)
    await cap.put_state(state)
    await _denied_write(cap_js, f"$KV.{CAMERAS_BUCKET}.{camera_key('cam1')}")
    assert denied(cap_errors, "Publish", f"$KV.{CAMERAS_BUCKET}.camera.cam1"), cap_errors

    # The client reads both and writes neither (it is read-only).
    view = await client.view()
    assert view.states == {"cam1": state} and set(view.configs) == {"cam1"}
    for key in (camera_key("cam1"), state_key("cam1")):
        await _denied_write(client_js, f"$KV.{CAMERAS_BUCKET}.{key}")
        assert denied(client_errors, "Publish", f"$KV.{CAMERAS_BUCKET}.{key}"), client_errors
    assert await cap.clear_state("cam1", "cap1")
    assert (await client.view()).states == {}

    # The publisher reads the bucket (the page) and writes neither kind of key.
    pub_errors: list[str] = []
    pub_js = (await auth_nats.connect("publisher", pub_errors)).jetstream(timeout=2)
    assert set((await (await CamerasBucket.open(pub_js, create=False)).view()).configs) == {"cam1"}
    for key in (camera_key("cam1"), state_key("cam1")):
        await _denied_write(pub_js, f"$KV.{CAMERAS_BUCKET}.{key}")
        assert denied(pub_errors, "Publish", f"$KV.{CAMERAS_BUCKET}.{key}"), pub_errors
    # Nothing else was denied: the JetStream API calls each needs are all allowed.
    forged = f'"$KV.{CAMERAS_BUCKET}.'
    assert [v for v in auth_nats.violations() if forged not in v] == []


async def test_clips_store_publisher_writes_client_reads(auth_nats: AuthServer) -> None:
    pub_js = (await auth_nats.connect("publisher")).jetstream(timeout=2)
    store = await pub_js.create_object_store(CLIPS_BUCKET)
    await store.put("clip-1", b"\x00" * 300_000)
    client_errors: list[str] = []
    client_js = (await auth_nats.connect("client", client_errors)).jetstream(timeout=2)
    got = await (await client_js.object_store(CLIPS_BUCKET)).get("clip-1")
    assert got.data == b"\x00" * 300_000
    await _denied_write(client_js, f"$O.{CLIPS_BUCKET}.M.forged")
    assert denied(client_errors, "Publish", f"$O.{CLIPS_BUCKET}.M.forged"), client_errors
    # Capture has nothing to do with clips.
    cap_errors: list[str] = []
    cap_js = (await auth_nats.connect("capture", cap_errors)).jetstream(timeout=1)
    with pytest.raises(Exception):  # noqa: B017 - denied: no answer
        await cap_js.object_store(CLIPS_BUCKET)
    assert denied(cap_errors, "Publish", f"$JS.API.STREAM.INFO.OBJ_{CLIPS_BUCKET}"), cap_errors


# ---- projects (issue 16): the projects service's own user -----------------------------------


async def test_projects_service_follows_releases_and_writes_only_its_reports(
    auth_nats: AuthServer,
) -> None:
    # The deployer stores a project and its desired release.
    dep_js = (await auth_nats.connect("deployer")).jetstream(timeout=2)
    deployments = await dep_js.create_key_value(api.KeyValueConfig(bucket=DEPLOYMENTS_BUCKET))
    store = await dep_js.create_object_store(PROJECTS_BUCKET)
    await store.put(project_object_name("p1", "1"), b"packed project")
    await deployments.put(project_key("p1"), b"release 1")

    errors: list[str] = []
    js = (await auth_nats.connect(PROJECTS_USER, errors)).jetstream(timeout=2)
    kv = await js.key_value(DEPLOYMENTS_BUCKET)
    async for entry in await kv.watch("project.>"):  # what the service follows
        assert entry is not None and entry.value == b"release 1"
        break
    got = await (await js.object_store(PROJECTS_BUCKET)).get(project_object_name("p1", "1"))
    assert got.data == b"packed project"
    await kv.put(project_report_key("p1", "box1"), b"running")
    state = await js.create_key_value(api.KeyValueConfig(bucket=project_state_bucket("p1")))
    assert (await state.status()).bucket == project_state_bucket("p1")
    await js.delete_key_value(project_state_bucket("p1"))  # project removed: its state too

    await _denied_write(js, f"$KV.{DEPLOYMENTS_BUCKET}.{project_key('p1')}")
    assert denied(errors, "Publish", f"$KV.{DEPLOYMENTS_BUCKET}.project.p1"), errors
    with pytest.raises(Exception):  # noqa: B017 - lensbus's own streams are not its to manage
        await js.purge_stream(f"KV_{DEPLOYMENTS_BUCKET}")
    assert (await deployments.get(project_key("p1"))).value == b"release 1"
    forged = f'"$KV.{DEPLOYMENTS_BUCKET}.project.p1"'
    purge = f'"$JS.API.STREAM.PURGE.KV_{DEPLOYMENTS_BUCKET}"'
    assert [v for v in auth_nats.violations() if forged not in v and purge not in v] == []
