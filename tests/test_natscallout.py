"""Per-project NATS users through nats-server's auth callout (lensbus.natscallout,
lensbus.natsprojects), on a real nats-server with the generated authorization.

A project's process connects as ``project-<name>`` with the password only the projects service
can derive; the callout service (the ``projects`` user) answers the server with that project's
permissions, and the server enforces them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.js import api
from nats.js.errors import KeyNotFoundError
from test_natsauth import AuthServer, denied, until

from lensbus import natsauth
from lensbus.natscallout import (
    GLOBAL_ACCOUNT,
    CalloutError,
    CalloutService,
    _jti,
    decode_jwt,
    encode_jwt,
    generate_issuer,
    parse_request,
    response_jwt,
    user_jwt,
)
from lensbus.natsprojects import project_authorizer, project_password, project_user
from lensbus.natsserver import NatsServer
from lensbus.subjects import Subjects, project_state_bucket

PROJECTS = ("alpha", "beta")  # the projects the callout knows

# A JWT nats-io/jwt (Go) made (v2/account_claims_test.go): its signature and jti must check
# out with ours, so the encoding we sign is the one the server's library reads.
GO_JWT = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiI3V0NYQkZKS0lIN1Y0SkdPR0FVTEtTS05a"
    "QUxVTUZMVExZWVgyNTdDSzZORk5OWTdGRVdBIiwiaWF0IjoxNjQ0Mjc5NDY3LCJpc3MiOiJPQk5UUVJFSEVJUFJFVE1B"
    "VlBWUVVDSUdFUktHWkIzRVJBVjVTNUdNM0lPRVFOSFJFQkpPVUFSRiIsIm5hbWUiOiJ0ZXN0Iiwic3ViIjoiQUM2SFFJ"
    "MlVBTVVQREVQN1dTWVFZV1JDTEVZQkxZVlNQTDZBSExDVVBKVEdVMzJUNEtRQktZU0ciLCJuYXRzIjp7ImxpbWl0cyI6"
    "eyJzdWJzIjotMSwiZGF0YSI6LTEsInBheWxvYWQiOi0xLCJpbXBvcnRzIjotMSwiZXhwb3J0cyI6LTEsIndpbGRjYXJk"
    "cyI6dHJ1ZSwiY29ubiI6LTEsImxlYWYiOi0xfSwiZGVmYXVsdF9wZXJtaXNzaW9ucyI6eyJwdWIiOnt9LCJzdWIiOnt9"
    "fSwidHlwZSI6ImFjY291bnQiLCJ2ZXJzaW9uIjoyfX0.73vDu9osNeLKwQ-g1Uu1fAtszMNz_QRZXRJLp0kzZh-0eMBm"
    "t0nb2mMwBwg-fufJs1FqYe9WbWKeXAYStnVnBg"
)
USER_NKEY = "UCLBVBKIKHPYQI7JMCLRUO2JSBNIH5SABHGE7IJCUAP6WQCNLQNF3JNY"  # any user public key

# ---- the claims themselves -----------------------------------------------------------------


def test_reads_a_jwt_nats_io_jwt_made() -> None:
    claims = decode_jwt(GO_JWT)
    assert claims["name"] == "test" and claims["nats"]["type"] == "account"
    assert _jti(claims) == claims["jti"]
    tampered = GO_JWT.replace(".eyJqdGki", ".eyJqdGkj", 1)
    with pytest.raises(CalloutError):
        decode_jwt(tampered)


def test_user_and_response_jwts() -> None:
    seed, issuer = generate_issuer()
    perms = natsauth.project_permissions("alpha")
    token = user_jwt(USER_NKEY, seed, "project-alpha", {**perms, "allow_responses": True})
    claims = decode_jwt(token)
    assert claims["iss"] == issuer and claims["sub"] == USER_NKEY
    assert claims["aud"] == GLOBAL_ACCOUNT and "exp" not in claims
    assert claims["jti"] == _jti(claims)
    nats = claims["nats"]
    assert nats["type"] == "user" and nats["version"] == 2
    assert nats["pub"]["allow"] == perms["publish"]["allow"]
    assert nats["sub"]["allow"] == perms["subscribe"]["allow"]
    assert nats["resp"] == {"max": 1, "ttl": 0}
    assert nats["allowed_connection_types"] == ["STANDARD"]
    resp = decode_jwt(response_jwt(USER_NKEY, "NSERVER", seed, jwt=token))
    assert resp["nats"] == {"jwt": token, "type": "authorization_response", "version": 2}
    refused = decode_jwt(response_jwt(USER_NKEY, "NSERVER", seed, error="no"))
    assert refused["nats"]["error"] == "no" and "jwt" not in refused["nats"]
    with pytest.raises(ValueError, match="jwt or an error"):
        response_jwt(USER_NKEY, "NSERVER", seed, jwt=token, error="no")


def test_a_request_not_signed_by_a_server_is_refused() -> None:
    seed, _ = generate_issuer()  # an account key, not a server's
    forged = encode_jwt(
        {"sub": "x", "nats": {"type": "authorization_request", "user_nkey": USER_NKEY}}, seed
    )
    with pytest.raises(CalloutError, match="wrong kind"):
        parse_request(forged.encode())
    for junk in (b"", b"\xff\xfe", b"a.b", b"a.b.c"):
        with pytest.raises(CalloutError):
            parse_request(junk)


def test_project_passwords_and_the_authorizer() -> None:
    seed, _ = generate_issuer()
    other, _ = generate_issuer()
    pw = project_password(seed, "alpha")
    assert natsauth.PASSWORD_PATTERN.fullmatch(pw)
    assert pw == project_password(seed, "alpha")
    assert pw not in (project_password(seed, "beta"), project_password(other, "alpha"))
    assert project_user("alpha") == "project-alpha"
    with pytest.raises(ValueError):
        project_user("a.b")
    authorize = project_authorizer(seed, "site1", exists=lambda n: n in PROJECTS)
    perms = authorize("project-alpha", pw)
    assert perms is not None and "site1.projects.alpha.>" in perms["publish"]["allow"]
    assert authorize("project-alpha", pw + "x") is None
    assert authorize("project-gamma", project_password(seed, "gamma")) is None  # unknown
    assert authorize("alpha", pw) is None and authorize("capture", pw) is None


# ---- a real server with the callout ----------------------------------------------------------


class CalloutServer(AuthServer):
    def __init__(self, server: NatsServer, passwords: dict[str, str], seed: str) -> None:
        super().__init__(server, passwords)
        self.seed = seed
        self.callout: CalloutService | None = None

    async def start_callout(self) -> CalloutService:
        nc = await self.connect(natsauth.PROJECTS_USER)
        authorize = natsauth.project_authorizer(self.seed, exists=lambda n: n in PROJECTS)
        self.callout = CalloutService(nc, self.seed, authorize)
        await self.callout.start()
        return self.callout

    def refusal(self, user: str, password: str) -> bytes:
        """What the server answers a raw CONNECT (nats-py leaves a socket open after a
        refused one): '-ERR ...' or 'PONG'."""
        with socket.create_connection((self.server.host, self.server.port), 10) as sock:
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"INFO ")
            creds = {"user": user, "pass": password, "verbose": False, "pedantic": False}
            sock.sendall(f"CONNECT {json.dumps(creds)}\r\nPING\r\n".encode())
            return sock.recv(4096)


@pytest.fixture
async def callout_nats(tmp_path: Path) -> AsyncIterator[CalloutServer]:
    secrets = natsauth.generate_callout_secrets()
    passwords = natsauth.generate_passwords()
    config = natsauth.authorization_block(passwords, callout=secrets["issuer"])
    server = NatsServer(tmp_path / "nats", extra_config=config, log_file=tmp_path / "nats.log")
    server.start()
    for name in PROJECTS:
        passwords[project_user(name)] = project_password(secrets["seed"], name)
    auth = CalloutServer(server, passwords, secrets["seed"])
    yield auth
    if auth.callout is not None:
        await auth.callout.stop()
    for nc in auth.conns:
        if not nc.is_closed:
            await nc.close()
    server.stop()


async def test_a_project_publishes_its_outputs_and_events_and_reads_results(
    callout_nats: CalloutServer,
) -> None:
    callout = await callout_nats.start_callout()
    s = Subjects()
    seen: list[tuple[str, bytes]] = []

    async def on_msg(msg: Any) -> None:
        seen.append((msg.subject, msg.data))

    client = await callout_nats.connect("client")
    await client.subscribe(s.all_projects(), cb=on_msg)
    await client.subscribe(s.all_events(), cb=on_msg)
    await client.subscribe(s.all_results(), cb=on_msg)
    await client.flush()

    errors: list[str] = []
    alpha = await callout_nats.connect(project_user("alpha"), errors)
    assert callout.counts == {"allowed": 1}
    results: list[bytes] = []

    async def on_result(msg: Any) -> None:
        results.append(msg.data)

    await alpha.subscribe(s.all_results(), cb=on_result)
    await alpha.subscribe(s.all_frames())
    await alpha.flush()
    inference = await callout_nats.connect("inference")
    await inference.publish(s.results("cam1"), b"a result")
    await until(lambda: results == [b"a result"], 5, "the project reading a result")

    mine = s.project_output("alpha", "cam1", "count")
    await alpha.publish(mine, b"3")
    await alpha.publish(s.project_overlay("alpha", "cam1"), b"shapes")
    await alpha.publish(s.project_event("alpha", "cam1"), b"an event")
    # Events only on its own subject (the publisher republishes them): none it could forge.
    forged = [s.results("cam1"), s.project_output("beta", "cam1", "count"), s.frames("cam1")]
    forged += [s.events("cam1"), s.project_event("beta", "cam1")]
    for subject in forged:
        await alpha.publish(subject, b"forged")
    await alpha.subscribe("lensbus.api.deployer.*")
    await alpha.flush()
    await until(
        lambda: (
            all(denied(errors, "Publish", x) for x in forged)
            and denied(errors, "Subscription", "lensbus.api.deployer.*")
        ),
        5,
        "the server's denials",
    )
    own_event = s.project_event("alpha", "cam1")
    assert not any(denied(errors, "Publish", x) for x in (mine, own_event)), errors
    assert not any(denied(errors, "Subscription", x) for x in (s.all_frames(), s.all_results()))
    await until(lambda: len(seen) >= 4, 5, "the project's outputs at the client")
    await client.flush()
    assert (mine, b"3") in seen and (own_event, b"an event") in seen
    assert (s.project_overlay("alpha", "cam1"), b"shapes") in seen
    assert not [x for x in seen if x[1] == b"forged"], seen


async def test_the_state_bucket_is_the_projects_own(callout_nats: CalloutServer) -> None:
    await callout_nats.start_callout()
    # The projects service creates the state buckets (the projects user may).
    service = (await callout_nats.connect(natsauth.PROJECTS_USER)).jetstream(timeout=2)
    for name in PROJECTS:
        await service.create_key_value(api.KeyValueConfig(bucket=project_state_bucket(name)))
    beta = (
        await (await callout_nats.connect(project_user("beta")))
        .jetstream()
        .key_value(project_state_bucket("beta"))
    )
    await beta.put("secret", b"beta's")

    errors: list[str] = []
    js = (await callout_nats.connect(project_user("alpha"), errors)).jetstream(timeout=1)
    kv = await js.key_value(project_state_bucket("alpha"))
    await kv.put("count", b"1")
    await kv.put("count", b"2")
    assert (await kv.get("count")).value == b"2"
    assert await kv.keys() == ["count"]
    async for entry in await kv.watchall():  # what ctx.state reads at start
        if entry is not None:
            assert entry.key == "count" and entry.value == b"2"
            break
    await kv.delete("count")
    with pytest.raises(KeyNotFoundError):
        await kv.get("count")

    other = project_state_bucket("beta")
    with pytest.raises(Exception):  # noqa: B017 - denied: the JetStream API never answers
        await js.key_value(other)
    with pytest.raises(Exception):  # noqa: B017
        await js.publish(f"$KV.{other}.secret", b"overwritten", timeout=1)
    with pytest.raises(Exception):  # noqa: B017 - nor may it make a bucket of its own
        await js.create_key_value(api.KeyValueConfig(bucket="lensbus-project-alpha2"))
    assert denied(errors, "Publish", f"$JS.API.STREAM.INFO.KV_{other}"), errors
    assert denied(errors, "Publish", f"$KV.{other}.secret"), errors
    assert denied(errors, "Publish", "$JS.API.STREAM.CREATE.KV_lensbus-project-alpha2"), errors
    assert (await beta.get("secret")).value == b"beta's"


async def test_wrong_passwords_and_unknown_users_are_refused(
    callout_nats: CalloutServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    callout = await callout_nats.start_callout()
    wrong = project_password(callout_nats.seed, "alpha") + "x"
    attempts = [
        ("project-alpha", wrong),  # a wrong password
        ("project-gamma", project_password(callout_nats.seed, "gamma")),  # no such project
        ("intruder", "pintruder-password"),  # not a project user at all
    ]
    for user, password in attempts:
        reply = await asyncio.to_thread(callout_nats.refusal, user, password)
        assert b"-ERR 'Authorization Violation'" in reply, (user, reply)
    assert callout.counts == {"refused": 3}
    assert "project-gamma" in caplog.text
    for _, password in attempts:  # refusals are logged, their passwords never
        assert password not in caplog.text
    right = project_password(callout_nats.seed, "alpha")
    assert b"PONG" in await asyncio.to_thread(callout_nats.refusal, "project-alpha", right)
    assert right not in caplog.text


async def test_configured_users_bypass_the_callout(callout_nats: CalloutServer) -> None:
    callout = await callout_nats.start_callout()
    for user in natsauth.USERS:  # every configured user connects; the callout is never asked
        await callout_nats.connect(user)
    assert callout.counts == {}
    reply = await asyncio.to_thread(callout_nats.refusal, "capture", "pwrong-password-123")
    assert b"-ERR 'Authorization Violation'" in reply  # nor does it vouch for a wrong one
    assert callout.counts == {}

    # The callout service down: project users are refused (the server times the request
    # out), every configured user still connects.
    await callout.stop()
    alpha = callout_nats.passwords[project_user("alpha")]
    reply = await asyncio.to_thread(callout_nats.refusal, project_user("alpha"), alpha)
    assert b"-ERR 'Authorization Violation'" in reply, reply
    for user in natsauth.USERS:
        nc = await nats_py.connect(
            callout_nats.url,
            user=user,
            password=callout_nats.passwords[user],
            allow_reconnect=False,
        )
        await nc.close()
