"""The leaf link secured (lensbus.natsleafauth), on real nats-servers: the hub's leaf port lets
in only a device's own nkey over TLS, and a device linked that way cannot change the hub's
JetStream (nor any other domain's) through the link, while the reads the fleet needs answer.
The whole fleet (tests/test_fleet.py) runs over this same secured link."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats as nats_py
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import ServiceUnavailableError
from test_fleet import DEVICE, LeafPair

from lensbus import natsauth
from lensbus.jsperms import domain_api
from lensbus.natscallout import generate_nkey, public_nkey
from lensbus.natsleaf import DEFAULT_HUB_DOMAIN, device_leafnodes, hub_leafnodes
from lensbus.subjects import Subjects

S = Subjects()
HUB_API = domain_api(DEFAULT_HUB_DOMAIN)


async def wait_log(path: Path, text: str, timeout: float = 30.0) -> None:
    """Until ``text`` shows in a server's log (the server says why it refused)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)
    tail = path.read_text(errors="replace")[-1500:] if path.exists() else "(no log)"
    raise AssertionError(f"{text!r} not in {path.name} after {timeout:g} s:\n{tail}")


def refused_pair(root: Path, how: str) -> LeafPair:
    """A secured hub and a device that tries to link without what it needs: the device's
    remote speaks TLS whatever it is told (the hub requires it), so without the hub's CA it
    refuses the hub's certificate: a device never links to a hub it cannot verify."""
    pair = LeafPair(root, device_seed=generate_nkey() if how == "wrong key" else None)
    assert pair.tls is not None
    if how == "no key":
        pair.device.extra_config = device_leafnodes([pair.leaf_url], tls_ca=pair.tls.ca)
    if how == "other CA":  # its own key, but it does not trust the hub's certificate
        pair.device.extra_config = device_leafnodes([pair.leaf_url], nkey=pair.device_seed)
    return pair


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("wrong key", "Authorization Violation"),
        ("no key", "Authorization Violation"),
        ("other CA", "certificate signed by unknown authority"),
    ],
)
async def test_hub_refuses_a_device_without_its_key_or_tls(
    tmp_path: Path, how: str, said: str
) -> None:
    pair = refused_pair(tmp_path, how).start()
    try:
        # The device's server says why, and tries again (it never gives up on its hub).
        await wait_log(tmp_path / f"{DEVICE}.log", said)
        assert pair.leafs() == []
        hub = await nats_py.connect(pair.hub.url)  # the hub's own clients stay anonymous
        try:
            with pytest.raises((ServiceUnavailableError, NatsTimeout)):
                await hub.jetstream(domain=DEVICE, timeout=1.0).account_info()
        finally:
            await hub.close()
    finally:
        pair.stop()


async def test_device_cannot_change_the_hubs_jetstream(tmp_path: Path) -> None:
    pair = LeafPair(tmp_path).start()
    hub = await nats_py.connect(pair.hub.url)
    dev = await nats_py.connect(pair.device.url)
    try:
        await pair.linked(hub)
        assert [leaf["name"] for leaf in pair.leafs()] == [DEVICE]
        hjs = hub.jetstream()
        await hjs.add_stream(name="HUBKEEP", subjects=["keep.>"])
        await hjs.publish("keep.1", b"kept")

        async def from_device(call: str, body: bytes = b"") -> bytes | None:
            """A JetStream API call through the link; None: nothing answered (denied)."""
            try:
                return (await dev.request(f"{HUB_API}.{call}", body, timeout=2.0)).data
            except (NoRespondersError, NatsTimeout):
                return None

        # What the fleet needs answers: account, stream and message reads, a consumer.
        assert await from_device("INFO") is not None
        assert b'"HUBKEEP"' in (await from_device("STREAM.INFO.HUBKEEP") or b"")
        assert b"message" in (await from_device("STREAM.MSG.GET.HUBKEEP", b'{"seq":1}') or b"")
        # What would change the hub is never delivered to its JetStream.
        create = b'{"name":"EVIL","subjects":["evil.>"]}'
        for call, body in [
            ("STREAM.DELETE.HUBKEEP", b""),
            ("STREAM.PURGE.HUBKEEP", b""),
            ("STREAM.MSG.DELETE.HUBKEEP", b'{"seq":1}'),
            ("STREAM.UPDATE.HUBKEEP", b'{"name":"HUBKEEP","subjects":["x.>"]}'),
            ("STREAM.CREATE.EVIL", create),
        ]:
            assert await from_device(call, body) is None, call
        info = await hjs.stream_info("HUBKEEP")
        assert (info.state.messages, info.config.subjects) == (1, ["keep.>"])
        assert "EVIL" not in [s.config.name for s in await hjs.streams_info()]
        # The control: the same delete from the hub's own client is a valid call.
        assert await hjs.delete_stream("HUBKEEP")
    finally:
        await dev.close()
        await hub.close()
        pair.stop()


async def test_hub_with_lensbus_users_takes_its_devices_beside_them(tmp_path: Path) -> None:
    """A hub whose clients authenticate (natsauth's users, as lensbus up and compose run it):
    the devices are users of the same block, the device links with its key, the hub's own
    users work as before and an anonymous client is refused."""
    pair = LeafPair(tmp_path)
    assert pair.tls is not None
    passwords = natsauth.generate_passwords()
    devices = {DEVICE: public_nkey(pair.device_seed)}
    pair.hub.extra_config = (
        hub_leafnodes(int(pair.leaf_url.rsplit(":", 1)[1]), "127.0.0.1", pair.tls)
        + natsauth.authorization_block(passwords, leaf_devices=devices)
        + f'http: "127.0.0.1:{pair.hub_monitor}"\n'
    )
    pair.start()
    try:
        client = await nats_py.connect(  # the hub's deployer: it probes its devices
            pair.hub.url,
            user="deployer",
            password=passwords["deployer"],
            inbox_prefix=natsauth.inbox_prefix("deployer"),
        )
        try:
            await pair.linked(client)
            assert [leaf["name"] for leaf in pair.leafs()] == [DEVICE]
        finally:
            await client.close()
        anonymous = NATS()
        try:
            with pytest.raises(Exception, match="Authorization"):
                await anonymous.connect(pair.hub.url, allow_reconnect=False, connect_timeout=5)
        finally:
            await anonymous.close()  # a refused connect leaves its socket to the caller
    finally:
        pair.stop()
