"""Finding 4 of issue 13 on a real nats-server with the generated authorization: per-user
inboxes, swap reports scoped to a group, a read-only client beside an operator, heartbeats
checked against their subject (by the deployer and the publisher)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import api
from test_natsauth import AuthServer, denied, until

from lensbus import encode
from lensbus.bus import connect
from lensbus.cli.common import WrongUser, nats_user_options
from lensbus.natsauth import authorization_block, generate_passwords, inference_user
from lensbus.natsserver import NatsServer
from lensbus.schemas import Status, SwapReport
from lensbus.schemas.deploy import ModelVersionRef, report_key
from lensbus.settings import load_settings
from lensbus.subjects import DEPLOYMENTS_BUCKET, RESULTS_STREAM, Subjects

GROUP = "entrance"


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[AuthServer]:
    passwords = generate_passwords([GROUP])
    server = NatsServer(
        tmp_path / "nats", extra_config=authorization_block(passwords), log_file=tmp_path / "log"
    ).start()
    a = AuthServer(server, passwords)
    yield a
    for nc in a.conns:
        if not nc.is_closed:
            await nc.close()
    server.stop()


def _report(group: str, instance: str, state: str = "failed") -> bytes:
    ref = ModelVersionRef(name="m", version="1")
    rep = SwapReport(group=group, instance=instance, desired=ref, state=state, time_ns=1)  # type: ignore[arg-type]
    return encode(rep)


def _status(service: str, instance: str) -> bytes:
    return encode(
        Status(
            service=service,
            instance=instance,
            state="running",
            version="x",
            time_ns=1,
            interval_s=1,
        )
    )


async def test_each_user_reads_only_its_own_inbox(auth: AuthServer) -> None:
    # The URL's user picks the prefix too (the lensbus command's --nats-url).
    url = auth.url.replace("nats://", f"nats://client:{auth.passwords['client']}@")
    nc = await connect(url, name="t", reconnect=False)
    assert bytes(nc._inbox_prefix) == b"_INBOX_client"
    await nc.close()
    # Every JetStream path a program uses answers on the client's inbox: stream info,
    # ordered (push) consumer, durable pull consumer, KV watch. No denial at all.
    pub_js = (await auth.connect("publisher")).jetstream(timeout=2)
    await pub_js.add_stream(name=RESULTS_STREAM, subjects=["lensbus.results.*"])
    await (await auth.connect("inference")).jetstream().publish("lensbus.results.cam1", b"r1")
    js = (await auth.connect("client")).jetstream(timeout=2)
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    sub = await js.subscribe("lensbus.results.cam1", cb=on_msg, ordered_consumer=True)
    await until(lambda: got == [b"r1"], 5, "the ordered consumer's message")
    await sub.unsubscribe()
    psub = await js.pull_subscribe("lensbus.results.cam1", durable="mine", stream=RESULTS_STREAM)
    assert [m.data for m in await psub.fetch(1, timeout=5)] == [b"r1"]
    assert auth.violations() == []
    # A snooper: capture may not subscribe to the shared inbox or another user's.
    errors: list[str] = []
    cap = await auth.connect("capture", errors)
    for subject in ("_INBOX.>", "_INBOX_client.>"):
        await cap.subscribe(subject)
    await cap.flush()
    await until(lambda: denied(errors, "Subscription", "_INBOX_client.>"), 5, "inbox denial")
    assert denied(errors, "Subscription", "_INBOX.>"), errors


async def test_client_deletes_no_consumer_operator_may(auth: AuthServer) -> None:
    pub_js = (await auth.connect("publisher")).jetstream(timeout=2)
    await pub_js.add_stream(name=RESULTS_STREAM, subjects=["lensbus.results.*"])
    await pub_js.add_consumer(RESULTS_STREAM, api.ConsumerConfig(durable_name="theirs"))
    errors: list[str] = []
    client_js = (await auth.connect("client", errors)).jetstream(timeout=1)
    with pytest.raises(Exception):  # noqa: B017 - denied: no answer
        await client_js.delete_consumer(RESULTS_STREAM, "theirs")
    assert denied(errors, "Publish", f"$JS.API.CONSUMER.DELETE.{RESULTS_STREAM}.theirs")
    assert (await pub_js.consumer_info(RESULTS_STREAM, "theirs")).name == "theirs"
    operator_js = (await auth.connect("operator")).jetstream(timeout=2)
    assert await operator_js.delete_consumer(RESULTS_STREAM, "theirs")


async def test_reports_only_under_the_users_own_group(auth: AuthServer) -> None:
    dep_js = (await auth.connect("deployer")).jetstream(timeout=2)
    await dep_js.create_key_value(api.KeyValueConfig(bucket=DEPLOYMENTS_BUCKET))
    for user, own, other in [
        ("inference", "default", GROUP),
        (inference_user(GROUP), GROUP, "default"),
    ]:
        errors: list[str] = []
        js = (await auth.connect(user, errors)).jetstream(timeout=1)
        await js.publish(f"$KV.{DEPLOYMENTS_BUCKET}.{report_key(own, 'i1')}", _report(own, "i1"))
        forged = f"$KV.{DEPLOYMENTS_BUCKET}.{report_key(other, 'i1')}"
        with pytest.raises(Exception):  # noqa: B017 - the server drops it: no ack
            await js.publish(forged, _report(other, "i1"))
        assert denied(errors, "Publish", forged), (user, errors)


@pytest.mark.slow
async def test_deployer_refuses_reports_and_heartbeats_that_lie(
    auth: AuthServer, start_service: Any, tmp_path: Path
) -> None:
    dep = start_service(
        "deployer",
        auth.url,
        work_dir=tmp_path / "dep",
        nats_user="deployer",
        nats_password=auth.passwords["deployer"],
    )
    dep.wait_healthy(30)
    # inference may write report.default.*: one that names another instance than its key...
    js = (await auth.connect("inference")).jetstream(timeout=5)
    await js.publish(
        f"$KV.{DEPLOYMENTS_BUCKET}.{report_key('default', 'i1')}", _report("default", "i2")
    )
    # ... and capture heartbeats on its own subject that claim to be inference.
    cap = await auth.connect("capture")
    await cap.publish(Subjects().status("capture", "c1"), _status("inference", "evil"))
    await cap.flush()

    def rejected(reason: str) -> float:
        return dep.metric("lensbus_messages_rejected_total", f'reason="{reason}"')

    deadline = time.monotonic() + 20
    while rejected("key_mismatch") < 1 or rejected("subject_mismatch") < 1:
        assert time.monotonic() < deadline, dep.log
        await cap.publish(Subjects().status("capture", "c1"), _status("inference", "evil"))
        await asyncio.sleep(0.2)
    assert "evil" not in dep.log or "refused a heartbeat" in dep.log
    assert dep.stop() == 0


def test_publisher_hub_refuses_a_heartbeat_for_someone_else() -> None:
    from lensbus_publisher.config import PublisherSettings
    from lensbus_publisher.hub import Hub

    hub = Hub(load_settings(PublisherSettings))
    hub.on_status(_status("inference", "evil"), Subjects().status("capture", "c1"))
    assert hub.statuses == {} and hub.rejected == 1
    hub.on_status(_status("capture", "c1"), Subjects().status("capture", "c1"))
    assert set(hub.statuses) == {("capture", "c1")}


def test_cli_picks_the_user_by_what_the_command_does(tmp_path: Path) -> None:
    import argparse
    import json

    from lensbus.natsauth import generate_nkey
    from lensbus.natstls import ensure_tls

    tls = ensure_tls(tmp_path / "tls", ["127.0.0.1"])
    for user in ("client", "operator"):
        (tmp_path / f"{user}.nk").write_text(generate_nkey() + "\n")
    secrets = tmp_path / "secrets.json"
    nkeys = {"client": "client.nk", "operator": "operator.nk"}
    secrets.write_text(json.dumps({"nkeys": nkeys, "tls_ca": "tls/ca.pem"}))
    bare = argparse.Namespace(nats_url="tls://127.0.0.1:4222", secrets=str(secrets))
    for user in ("client", "operator"):
        opts = nats_user_options(bare, user)
        assert opts["nkeys_seed"] == str(tmp_path / f"{user}.nk")
        assert opts["inbox_prefix"] == f"_INBOX_{user}" and "user" not in opts
        assert opts["tls"].verify_mode == ssl.CERT_REQUIRED
    # --nkey: whose it is says --nats-user (default: the command's user); --tls-ca.
    given = argparse.Namespace(
        nats_url="tls://h:4222",
        nkey=str(tmp_path / "operator.nk"),
        nats_user=None,
        tls_ca=str(tls.ca),
        secrets=None,
    )
    assert nats_user_options(given, "operator")["inbox_prefix"] == "_INBOX_operator"
    given.nats_user = "operator"
    assert nats_user_options(given, "client")["inbox_prefix"] == "_INBOX_operator"
    given.nats_user = "client"
    with pytest.raises(WrongUser, match="operator"):
        nats_user_options(given, "operator")
    given.nkey = str(tls.ca)  # not a seed: refused, naming the file (not its content)
    with pytest.raises(WrongUser, match="ca.pem: not a NATS user nkey seed"):
        nats_user_options(given, "client")
    # An older lensbus up's file (passwords), and a URL naming its user, still work.
    secrets.write_text(json.dumps({"passwords": {"client": "pc", "operator": "po"}}))
    bare = argparse.Namespace(nats_url="nats://127.0.0.1:4222", secrets=str(secrets))
    assert nats_user_options(bare, "client") == {"user": "client", "password": "pc"}
    assert nats_user_options(bare, "operator") == {"user": "operator", "password": "po"}
    named = argparse.Namespace(nats_url="nats://client:pc@127.0.0.1:4222", secrets=None)
    assert nats_user_options(named, "client") == {}
    with pytest.raises(WrongUser, match="operator"):
        nats_user_options(named, "operator")
