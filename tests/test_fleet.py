"""Devices as leaf nodes of a hub (``lensbus.natsleaf``), with real nats-servers and real
service processes: the leaf link carries no frame and no bucket write; a device's results
reach the hub's fleet stream, every one once, also after an outage; a fleet deploy made while
the device was cut off is applied when it returns; bad fleet requests are refused by name."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import nats as nats_py
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue
from photos import photos

from lensbus import natstls
from lensbus.cli.main import main as cli_main
from lensbus.codec import encode
from lensbus.deployclient import DeployClient, DeployError
from lensbus.jsperms import ANY_DOMAIN, domain_api, domain_of, kv_stream
from lensbus.modelpkg import verify, write_package
from lensbus.natscallout import generate_nkey, public_nkey
from lensbus.natsleaf import (
    device_jetstream,
    device_leafnodes,
    fleet_permissions,
    hub_jetstream,
    hub_leafnodes,
)
from lensbus.natsleaf import main as natsleaf_main
from lensbus.natsleafauth import hub_authorization
from lensbus.natsserver import NatsServer, find_binary, free_port
from lensbus.schemas import FleetDevice, FleetDeviceStatus
from lensbus.subjects import InvalidName, Subjects
from lensbus_deployer.fleet_hub import results_source

YOLO = "yolov3-tiny-onnx"
MODEL = YOLO  # the package's name
DEVICE = "D1"
S = Subjects()


class LeafPair:
    """A hub and one device, each a nats-server with its own JetStream domain; the device a
    leaf node of the hub. ``secure`` (the default, as deploy/leaf sets it up): the hub's leaf
    port speaks TLS and lets in only the device's nkey, with the hub's deny list
    (lensbus.natsleafauth); ``device_seed`` another seed for the device (a refusal test).
    ``cut()`` restarts the device's server without its leaf remote (the link is gone, the
    device's services reconnect to it), ``restore()`` with it."""

    def __init__(
        self, root: Path, deny: bool = True, secure: bool = True, device_seed: str | None = None
    ) -> None:
        leaf_port, self.hub_monitor = free_port(), free_port()
        self.leaf_url = f"nats-leaf://127.0.0.1:{leaf_port}"
        self.tls = natstls.ensure_tls(root / "tls", ["127.0.0.1", "localhost"]) if secure else None
        tls, seed = self.tls, generate_nkey()
        self.device_seed = seed
        devices = {DEVICE: public_nkey(seed)} if secure else {}
        self.hub = NatsServer(
            root / "hub",
            server_name="hub",
            jetstream_config=hub_jetstream(),
            extra_config=hub_leafnodes(leaf_port, "127.0.0.1", tls)
            + hub_authorization(devices)
            + f'http: "127.0.0.1:{self.hub_monitor}"\n',
            log_file=root / "hub.log",
        )
        remote = device_leafnodes(
            [self.leaf_url],
            nkey=(device_seed or seed) if secure else None,
            tls_ca=tls.ca if tls else None,
        )
        if not deny:  # the control: the same link without the deny lists
            remote = (
                f'leafnodes {{\n  remotes: [ {{ url: "nats-leaf://127.0.0.1:{leaf_port}" }} ]\n}}\n'
            )
        self.remote = remote
        self.device = NatsServer(
            root / DEVICE,
            server_name=DEVICE,
            jetstream_config=device_jetstream(DEVICE),
            extra_config=remote,
            log_file=root / f"{DEVICE}.log",
        )

    def leafs(self) -> list[dict[str, Any]]:
        """The hub's leaf connections (its monitoring ``/leafz``)."""
        url = f"http://127.0.0.1:{self.hub_monitor}/leafz"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return list(json.loads(reply.read()).get("leafs") or [])

    def start(self) -> LeafPair:
        self.hub.start()
        self.device.start()
        return self

    def stop(self) -> None:
        self.device.stop()
        self.hub.stop()

    def cut(self) -> None:
        self.device.stop()
        self.device.extra_config = ""
        self.device.start()

    def restore(self) -> None:
        self.device.stop()
        self.device.extra_config = self.remote
        self.device.start()

    async def linked(self, nc: NATS, timeout: float = 30.0) -> None:
        """Until the hub reaches the device's JetStream through the link."""
        js = nc.jetstream(domain=DEVICE, timeout=1.0)
        await wait_for(lambda: _answers(js.account_info()), timeout, "the leaf link")


async def _answers(call: Awaitable[Any]) -> bool:
    try:
        await call
    except Exception:
        return False
    return True


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: last {last!r}")


@pytest.fixture
def leaf(tmp_path: Path) -> Any:
    pair = LeafPair(tmp_path / "servers").start()
    yield pair
    pair.stop()


class Counter:
    """Every message on a subject pattern, as a subscriber on one server sees them."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.sub: Subscription | None = None

    async def start(self, nc: NATS, pattern: str) -> Counter:
        async def on_msg(msg: Msg) -> None:
            self.subjects.append(msg.subject)

        self.sub = await nc.subscribe(pattern, cb=on_msg)
        return self

    @property
    def count(self) -> int:
        """Messages received, counted as the client reads them off its socket (in order, so
        before any message the server sent it later), not when the callback gets to them."""
        assert self.sub is not None
        return self.sub.delivered


async def marker_through(src: NATS, dst: NATS, timeout: float = 30.0) -> None:
    """Publish markers from ``src`` (on an inbox, which the link carries) until one reaches
    ``dst``. Then whatever ``src`` published before and the link let through has reached
    ``dst``'s server and client (one connection each hop keeps the order), and the interest
    of every subscription ``dst``'s server had before this call has reached ``src``'s server
    (interest crosses in order too)."""
    inbox = dst.new_inbox()
    sub = await dst.subscribe(inbox)
    await dst.flush()
    deadline = time.monotonic() + timeout
    try:
        while True:
            await src.publish(inbox, b"marker")
            await src.flush()
            try:
                await sub.next_msg(timeout=0.25)
                return
            except nats_py.errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no marker crossed the link in {timeout:g} s") from None
    finally:
        await sub.unsubscribe()


# ---- the leaf link itself ------------------------------------------------------------------


async def crossing(pair: LeafPair) -> dict[str, int]:
    """What crosses the link: frames published on the device seen by a hub subscriber, results
    published on the hub seen by a device subscriber, and bucket writes on either side stored
    by the other side's bucket of the same name. Each side's markers bound the wait: nothing
    is counted that arrives after the marker that followed it."""
    hub, dev = await nats_py.connect(pair.hub.url), await nats_py.connect(pair.device.url)
    try:
        await pair.linked(hub)
        frames = await Counter().start(hub, S.all_frames())
        results = await Counter().start(dev, S.all_results())
        kv = {}
        for name, nc in (("hub", hub), ("device", dev)):
            kv[name] = await nc.jetstream().create_key_value(bucket=S.deployments_bucket)
        # The subscriptions' and buckets' interest has crossed the link (where it may).
        await marker_through(dev, hub)
        await marker_through(hub, dev)
        for _ in range(20):
            await dev.publish(S.frames("cam1"), b"frame")
            await hub.publish(S.results("cam1"), b"result")
        await kv["device"].put("group.a", b"device")
        await kv["hub"].put("group.b", b"hub")
        # The cross-domain API passes: the hub reads the device's bucket through its domain.
        remote = await hub.jetstream(domain=DEVICE).key_value(S.deployments_bucket)
        assert (await remote.get("group.a")).value == b"device"
        # What was let through has arrived by now, and a bucket write that crossed is queued
        # to the other side's stream ahead of that side's own next write, stored in order.
        await marker_through(dev, hub)
        await marker_through(hub, dev)
        after = {"group.c", "group.d"}  # not asked about: they may cross later (the control)
        await kv["hub"].put("group.c", b"hub, after")
        await kv["device"].put("group.d", b"device, after")
        keys = {n: await bucket_keys(kv[n]) for n in kv}
        return {
            "frames": frames.count,
            "results": results.count,
            "kv": len(keys["hub"] - {"group.b", *after})
            + len(keys["device"] - {"group.a", *after}),
        }
    finally:
        await hub.close()
        await dev.close()


async def bucket_keys(kv: KeyValue) -> set[str]:
    """A bucket's keys; none is an answer too (nats-py raises on an empty bucket: seen in
    the open control, whose buckets' writes the link may answer from the other side)."""
    try:
        return set(await kv.keys())
    except NoKeysError:
        return set()


async def test_leaf_link_carries_no_frame_result_or_bucket_write(tmp_path: Path) -> None:
    pair = LeafPair(tmp_path / "denied").start()
    try:
        assert await crossing(pair) == {"frames": 0, "results": 0, "kv": 0}
    finally:
        pair.stop()
    # The control: without the deny lists, the same link carries them (so the above can fail).
    pair = LeafPair(tmp_path / "open", deny=False, secure=False).start()
    try:
        got = await crossing(pair)
    finally:
        pair.stop()
    # Bucket writes were not stored across even so (kv 0, measured): each domain's bucket
    # takes its own server's writes; the deny list keeps them from the link all the same.
    assert got["frames"] == 20 and got["results"] == 20, got


LEAF_CONFIGS = {  # deploy/leaf/: file -> the printer's arguments that made it
    "hub.conf": ["hub-config", "--tls-dir", "/etc/nats/tls", "--device", "D1=$LENSBUS_LEAF_D1"],
    "device-D1.conf": [
        "device-config",
        "D1",
        "--hub",
        "nats-leaf://hub.example:7422",
        "--nkey-env",
        "LENSBUS_LEAF_NKEY",
        "--tls-ca",
        "/etc/nats/tls/ca.pem",
    ],
}


def test_deploy_leaf_configs_are_current_and_accepted(tmp_path: Path, capsys) -> None:
    deploy = Path(__file__).resolve().parent.parent / "deploy" / "leaf"
    tls = natstls.ensure_tls(tmp_path / "tls", ["hub.example"])
    seed = generate_nkey()  # what device-key makes; the hub's config names its public key
    env = {"LENSBUS_LEAF_D1": public_nkey(seed), "LENSBUS_LEAF_NKEY": seed}
    for name, args in LEAF_CONFIGS.items():
        assert natsleaf_main(args) == 0
        text = capsys.readouterr().out
        assert (deploy / name).read_text() == text, (
            f"deploy/leaf/{name} is stale: python -m lensbus.natsleaf {' '.join(args)} > {name}"
        )
        conf = tmp_path / name
        text = text.replace("/data/jetstream", str(tmp_path / "js"))
        conf.write_text(text.replace("/etc/nats/tls", str(tls.ca.parent)))
        checked = subprocess.run(
            [find_binary(), "-t", "-c", str(conf)], capture_output=True, env=env
        )
        assert checked.returncode == 0, checked.stderr.decode()
    assert '"$KV.>"' in (deploy / "device-D1.conf").read_text()
    assert natsleaf_main(["device-config", "a.b", "--hub", "nats-leaf://h:7422"]) == 2
    assert "invalid device name 'a.b'" in capsys.readouterr().err
    assert natsleaf_main(["hub-config", "--device", "D1=nokey"]) == 2
    assert "--device D1: 'nokey' is not a public user nkey" in capsys.readouterr().err
    out = tmp_path / "d1.seed"
    assert natsleaf_main(["device-key", "D1", "--out", str(out)]) == 0
    device, public = capsys.readouterr().out.strip().split("=")
    assert (device, public) == ("D1", public_nkey(out.read_text().strip()))
    assert out.stat().st_mode & 0o777 == 0o600
    assert natsleaf_main(["device-key", "D1", "--out", str(out)]) == 2  # never overwritten


def test_domain_api_and_fleet_permissions() -> None:
    assert domain_api("D1") == "$JS.D1.API" and domain_of(domain_api("D1")) == "D1"
    assert domain_of("$JS.API") is None and domain_of(domain_api(ANY_DOMAIN)) is None
    with pytest.raises(InvalidName, match="invalid JetStream domain 'a.b'"):
        domain_api("a.b")
    deployer = fleet_permissions("deployer", hub_domain="main")["publish"]
    assert "$JS.*.API.INFO" in deployer  # the hub's probe of any device
    assert f"$JS.main.API.STREAM.INFO.OBJ_{S.models_bucket}" in deployer  # a device's copy
    assert fleet_permissions("client")["publish"] == [S.deployer_api("fleet_status")]


# ---- bad requests ------------------------------------------------------------------------------


@pytest.fixture
def hub_nats(tmp_path: Path) -> Any:
    """A hub's nats-server alone: JetStream domain ``hub``, no device."""
    server = NatsServer(
        tmp_path / "hub", jetstream_config=hub_jetstream(), log_file=tmp_path / "hub.log"
    ).start()
    yield server
    server.stop()


async def test_fleet_refusals_name_the_cause(
    hub_nats: NatsServer, start_service, demo_models, tmp_path: Path, capsys
) -> None:
    dep = start_service(
        "deployer", hub_nats.url, work_dir=tmp_path / "hub-deployer", fleet_hub="true"
    )
    plain = start_service("deployer", hub_nats.url, prefix="plain", work_dir=tmp_path / "p")
    dep.wait_healthy(30)
    plain.wait_healthy(30)
    async with await DeployClient.connect(hub_nats.url, prefix="plain", timeout_s=20) as dc:
        with pytest.raises(DeployError) as err:
            await dc.fleet_add(DEVICE)
        assert err.value.code == "bad_request" and "not a fleet hub's" in err.value.message
    assert plain.stop() == 0
    async with await DeployClient.connect(hub_nats.url, timeout_s=20) as dc:
        with pytest.raises(DeployError) as err:
            await dc.fleet_add("hub")
        assert err.value.code == "bad_request"
        assert "'hub' is this hub's own JetStream domain, not a device" in err.value.message
        with pytest.raises(DeployError) as err:
            await dc.fleet_deploy([DEVICE], "default", MODEL)
        assert err.value.code == "not_found" and f"no model named '{MODEL}'" in err.value.message
        await dc.upload(demo_models[YOLO])
        with pytest.raises(DeployError) as err:
            await dc.fleet_deploy([DEVICE], "default", MODEL)
        assert err.value.code == "not_found"
        assert "unknown device 'D1' (no device added yet); add it first" in err.value.message
        await dc.fleet_add(DEVICE)
        with pytest.raises(DeployError) as err:
            await dc.fleet_deploy([DEVICE, "D2"], "default", MODEL, "9")
        assert err.value.code == "not_found" and f"no model {MODEL}:9" in err.value.message
        with pytest.raises(DeployError) as err:
            await dc.fleet_deploy([DEVICE, "D2"], "default", MODEL)
        assert "unknown device 'D2' (devices: D1)" in err.value.message
        with pytest.raises(DeployError) as err:
            await dc.fleet_deploy(["a.b"], "default", MODEL)
        assert err.value.code == "bad_request" and "devices.0" in err.value.message
        with pytest.raises(DeployError) as err:
            await dc.fleet_remove("D2")
        assert err.value.code == "not_found"
        assert [d.device for d in await dc.fleet_status()] == [DEVICE]
        assert not [d.desired for d in await dc.fleet_status() if d.desired]  # nothing written
    url = ["--nats-url", hub_nats.url]
    with pytest.raises(SystemExit) as usage:
        cli_main(["deploy", MODEL, "--group", "g", "--devices", "D1,x.y", *url])
    assert usage.value.code == 2 and "invalid device name 'x.y'" in capsys.readouterr().err
    cli = asyncio.to_thread  # the CLI runs its own event loop
    assert await cli(cli_main, ["deploy", MODEL, "--group", "g", "--devices", "D9", *url]) == 1
    assert "refused (not_found): unknown device 'D9'" in capsys.readouterr().err
    assert await cli(cli_main, ["fleet", "add", "hub", *url]) == 1
    assert "refused (bad_request): 'hub' is this hub's own JetStream domain" in (
        capsys.readouterr().err
    )
    assert await cli(cli_main, ["fleet", "remove", DEVICE, *url]) == 0
    assert await cli(cli_main, ["fleet", "list", *url]) == 0
    assert "no devices yet" in capsys.readouterr().out
    refused = 'outcome="not_found",verb="deploy"'
    assert dep.metric("lensbus_deployer_fleet_changes_total", refused) >= 4
    assert dep.stop() == 0


async def _desired_keys(js: Any) -> set[str]:
    """The ``desired.<D>.<G>`` keys of the hub's fleet bucket, read past the deployer."""
    kv = await js.key_value(S.fleet_bucket)
    return {k for k in await bucket_keys(kv) if k.startswith("desired.")}


async def test_fleet_deploy_to_a_device_group(
    hub_nats: NatsServer, start_service, demo_models, tmp_path: Path, capsys
) -> None:
    """A device group is resolved by the hub's deployer when it writes the desired models:
    exactly its devices get one; an unknown (or emptied) group is refused by name."""
    dep = start_service(
        "deployer", hub_nats.url, work_dir=tmp_path / "hub-deployer", fleet_hub="true"
    )
    dep.wait_healthy(30)
    nc = await nats_py.connect(hub_nats.url)
    js = nc.jetstream()
    try:
        async with await DeployClient.connect(hub_nats.url, timeout_s=20) as dc:
            await dc.upload(demo_models[YOLO])
            reply = await dc.fleet_add("D1", ["roof", "north", "north"])
            assert reply.device is not None and reply.device.groups == ["north", "roof"]
            assert reply.changes[0] == "device D1 recorded in device groups north, roof"
            await dc.fleet_add("D2", ["north"])
            await dc.fleet_add("D3", ["south"])
            # Written by a release before device groups: read as in none.
            old = msgpack.unpackb(encode(FleetDevice(device="D4", added_ns=1)))
            del old["groups"]
            await (await js.key_value(S.fleet_bucket)).put("device.D4", msgpack.packb(old))
            desired = await dc.fleet_deploy([], "cams", MODEL, device_group="north")
            assert sorted(d.device for d in desired) == ["D1", "D2"]
            assert await _desired_keys(js) == {"desired.D1.cams", "desired.D2.cams"}
            groups = {d.device: d.groups for d in await dc.fleet_status()}
            assert groups == {"D1": ["north", "roof"], "D2": ["north"], "D3": ["south"], "D4": []}
            # Adding an added device again with groups changes them (and nothing else).
            reply = await dc.fleet_add("D2", ["roof"])
            assert reply.changes == ["device groups now roof (were north)"]
            assert (await dc.fleet_add("D2")).changes == []  # no groups given: kept
            await dc.fleet_add("D4", ["north"])
            desired = await dc.fleet_deploy([], "door", MODEL, device_group="north")
            assert sorted(d.device for d in desired) == ["D1", "D4"]
            door = {"desired.D1.door", "desired.D4.door"}  # D2 is no longer in north
            assert await _desired_keys(js) == {"desired.D1.cams", "desired.D2.cams", *door}
            for name in ("west", "south"):
                if name == "south":  # emptied: as unknown as a group never named
                    await dc.fleet_add("D3", [])
                with pytest.raises(DeployError) as err:
                    await dc.fleet_deploy([], "cams", MODEL, device_group=name)
                assert err.value.code == "not_found"
                assert f"unknown device group {name!r}: no device belongs to it" in (
                    err.value.message
                )
            assert "(device groups: north (D1 D4), roof (D1 D2))" in err.value.message
            with pytest.raises(DeployError) as err:
                await dc.fleet_deploy(["D1"], "cams", MODEL, device_group="north")
            assert err.value.code == "bad_request" and "not both" in err.value.message
            with pytest.raises(DeployError) as err:
                await dc.fleet_add("D1", ["a.b"])
            assert err.value.code == "bad_request" and "groups.0" in err.value.message
            assert len(await _desired_keys(js)) == 4  # nothing written by a refusal
    finally:
        await nc.close()
    await _device_groups_from_the_cli(hub_nats.url, capsys)
    assert dep.stop() == 0


async def _device_groups_from_the_cli(nats_url: str, capsys: Any) -> None:
    """The CLI's side of test_fleet_deploy_to_a_device_group (its devices D1-D4)."""
    url = ["--nats-url", nats_url]
    cli = asyncio.to_thread  # the CLI runs its own event loop
    deploy = ["deploy", MODEL, "--group", "g"]
    assert await cli(cli_main, [*deploy, "--device-group", "west", *url]) == 1
    assert "refused (not_found): unknown device group 'west'" in capsys.readouterr().err
    assert await cli(cli_main, ["fleet", "add", "D3", "--groups", "east,west", *url]) == 0
    assert "device D3: device groups now east, west (were none)" in capsys.readouterr().out
    assert await cli(cli_main, [*deploy, "--device-group", "west", *url]) == 0
    out = capsys.readouterr().out
    assert "device group west: D3" in out and "device D3, group g: desired model is now" in out
    assert await cli(cli_main, ["fleet", "list", *url]) == 0
    assert "device groups: east, west" in capsys.readouterr().out
    assert await cli(cli_main, ["status", "--fleet", *url]) == 0
    assert "device D1  (device groups: north, roof)" in capsys.readouterr().out
    for bad in (["--device-group", "a.b"], ["--device-group", "north", "--devices", "D1"]):
        with pytest.raises(SystemExit) as usage:
            cli_main([*deploy, *bad, *url])
        assert usage.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli_main(["fleet", "add", "D1", "--groups", "north,x.y", *url])
    assert usage.value.code == 2 and "invalid device group 'x.y'" in capsys.readouterr().err


def test_device_settings_refuse_a_bad_device_name() -> None:
    from pydantic import ValidationError

    from lensbus_deployer.config import DeployerSettings

    with pytest.raises(ValidationError) as err:
        DeployerSettings(fleet_device="a.b")
    assert "fleet_device" in str(err.value) and "invalid device name 'a.b'" in str(err.value)
    with pytest.raises(ValidationError) as err:
        DeployerSettings(fleet_device="hub")
    assert "must differ from fleet_hub_domain" in str(err.value)
    with pytest.raises(ValidationError) as err:
        DeployerSettings(fleet_device="D1", fleet_hub=True)
    assert "a deployer is a hub's or a device's" in str(err.value)
    assert DeployerSettings(fleet_results_max_bytes=-1).fleet_results_max_bytes == -1
    with pytest.raises(ValidationError) as err:
        DeployerSettings(fleet_results_max_bytes=0)
    assert "fleet_results_max_bytes" in str(err.value) and "give -1 for no limit" in str(err.value)
    with pytest.raises(ValidationError) as err:
        DeployerSettings(fleet_results_max_bytes=-2)
    assert "fleet_results_max_bytes" in str(err.value) and "greater than or equal to -1" in str(
        err.value
    )


# ---- the hub's watch: sources healed, one deployer at a time ---------------------------------


def _devices_sourced(config: Any) -> set[str]:
    return {domain_of(s.external.api) for s in config.sources or [] if s.external} - {None}


async def _sourced(js: Any, device: str, present: bool) -> bool:
    """Whether both fleet streams source ``device`` (``present``) or neither does."""
    for stream in (S.fleet_results_stream, kv_stream(S.fleet_bucket)):
        if (device in _devices_sourced((await js.stream_info(stream)).config)) != present:
            return False
    return True


async def _drop_source(js: Any, stream: str, device: str) -> None:
    """What a restart whose second update failed leaves: the device's source gone."""
    config = (await js.stream_info(stream)).config
    config.sources = [s for s in config.sources if domain_of(s.external.api) != device]
    await js.update_stream(config)


def _runs_watch(dep: Any, instance: str) -> bool:
    return f"this deployer ({instance}) runs the source watch" in dep.log


def _hub_deployers(start_service, url: str, tmp_path: Path) -> dict[str, Any]:
    """Two deployers of one hub (one queue group), a watch round every 0.5 s."""
    deps = {
        name: start_service(
            "deployer",
            url,
            work_dir=tmp_path / name,
            fleet_hub="true",
            fleet_check_s=0.5,
            instance=name,
        )
        for name in ("hubA", "hubB")
    }
    for dep in deps.values():
        dep.wait_healthy(30)
    return deps


async def test_hub_watch_heals_sources_one_deployer_at_a_time(
    hub_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    deps = _hub_deployers(start_service, hub_nats.url, tmp_path)
    nc = await nats_py.connect(hub_nats.url)
    js = nc.jetstream()
    try:
        async with await DeployClient.connect(hub_nats.url, timeout_s=20) as dc:
            reply = await dc.fleet_add(DEVICE)
        assert reply.changes == [
            f"device {DEVICE} recorded",
            f"the hub's {S.fleet_results_stream} sources its results",
            f"the hub's {S.fleet_bucket} sources its seen report",
        ]

        async def holder() -> str | None:  # the other waits for the lease to expire (6.5 s)
            running = [name for name, dep in deps.items() if _runs_watch(dep, name)]
            assert len(running) <= 1, f"both hub deployers run the watch: {running}"
            return running[0] if running else None

        first = await wait_for(holder, 30, "a hub deployer to run the watch")
        # The gauges come from the watch's rounds, on every hub deployer (no fleet status asked).
        for dep in deps.values():
            await wait_for(
                lambda dep=dep: asyncio.to_thread(_gauges_show, dep, DEVICE), 30, "fleet gauges"
            )
        # A lost source is added back; a source of a device not recorded is removed.
        await _drop_source(js, S.fleet_results_stream, DEVICE)
        await _drop_source(js, kv_stream(S.fleet_bucket), DEVICE)
        await wait_for(lambda: _sourced(js, DEVICE, True), 30, "the lost sources added back")
        config = (await js.stream_info(S.fleet_results_stream)).config
        config.sources = [*config.sources, results_source(S, "D9")]
        await js.update_stream(config)
        await wait_for(lambda: _sourced(js, "D9", False), 30, "the unrecorded source removed")
        # The stream's limits are the settings' (8 GiB by default), kept in place.
        config = (await js.stream_info(S.fleet_results_stream)).config
        await js.update_stream(dataclasses.replace(config, max_bytes=1024 * 1024))
        await wait_for(lambda: _max_bytes(js, 8 * 1024**3), 30, "the byte limit put back")
        # The holder gone, the other takes the watch over and heals as it did.
        assert deps[first].stop() == 0
        other = next(name for name in deps if name != first)
        await wait_for(
            lambda: asyncio.to_thread(_runs_watch, deps[other], other), 30, "the takeover"
        )
        await _drop_source(js, S.fleet_results_stream, DEVICE)
        await wait_for(lambda: _sourced(js, DEVICE, True), 30, "the source added back again")
        assert "source of D1 added back" in deps[other].log
    finally:
        await nc.close()
    assert deps[other].stop() == 0


async def _max_bytes(js: Any, limit: int) -> bool:
    return (await js.stream_info(S.fleet_results_stream)).config.max_bytes == limit


def _gauges_show(dep: Any, device: str) -> bool:
    samples = dep.metrics()
    return (
        samples.get("lensbus_deployer_fleet_devices") == 1
        and f'lensbus_deployer_fleet_results_lag{{device="{device}"}}' in samples
    )


# ---- the model copy: its subscription ends however the copy ends ----------------------------


async def test_object_read_leaves_no_subscription(tmp_path: Path) -> None:
    from lensbus_deployer.fleet_copy import read_object

    mon = free_port()
    with NatsServer(tmp_path / "nats", extra_config=f"http: 127.0.0.1:{mon}\n") as server:
        nc = await nats_py.connect(server.url)
        try:
            js = nc.jetstream()
            obs = await js.create_object_store(S.models_bucket)
            data = bytes(range(256)) * 2048  # 512 KiB: 4 chunks of nats-py's 128 KiB
            await obs.put("pkg", data)
            got = bytearray()
            await read_object(js, obs, S.models_bucket, "pkg", got.extend)
            assert bytes(got) == data
            before = await asyncio.to_thread(_subscriptions, mon)

            def refuse(chunk: bytes) -> None:
                raise ValueError("larger than announced")

            def slow(chunk: bytes) -> None:
                time.sleep(0.5)

            with pytest.raises(ValueError):
                await read_object(js, obs, S.models_bucket, "pkg", refuse)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read_object(js, obs, S.models_bucket, "pkg", slow), 0.2)
            await nc.flush()
            # None left behind (one of nats-py's may still be closing when "before" is read).
            assert await asyncio.to_thread(_subscriptions, mon) <= before
            # The control: nats-py's own get leaves its subscription behind when a write fails.
            with pytest.raises(ValueError):
                await obs.get("pkg", writeinto=_Refusing())  # type: ignore[arg-type]
            await nc.flush()
            assert await asyncio.to_thread(_subscriptions, mon) == before + 1
        finally:
            await nc.close()


class _Refusing:
    def write(self, data: bytes) -> int:
        raise ValueError("refused")


def _subscriptions(monitor_port: int) -> int:
    """The client's subscriptions as the server counts them (``/connz``: one client)."""
    import json
    import urllib.request

    url = f"http://127.0.0.1:{monitor_port}/connz"
    with urllib.request.urlopen(url, timeout=5) as reply:
        (conn,) = json.load(reply)["connections"]
    return int(conn["subscriptions"])


# ---- a device's whole life: deploy, results, an outage, a deploy while away ------------------


def version_of(src: Path, dest: Path, version: str) -> Path:
    """A copy of a package under another version."""
    shutil.copytree(src, dest)
    pkg = verify(dest)
    manifest = pkg.manifest.model_dump(exclude={"v", "files"})
    manifest["version"] = version
    write_package(dest, {"model": pkg.path("model").name}, **manifest)
    return dest


async def device_report(dc: DeployClient) -> FleetDeviceStatus | None:
    devices = await dc.fleet_status(DEVICE)
    return devices[0] if devices else None


def serving(version: str) -> Callable[[FleetDeviceStatus | None], bool]:
    ref = f"{MODEL}:{version}"

    def check(status: FleetDeviceStatus | None) -> bool:
        seen = status.seen if status else None
        groups = {g.group: g for g in (seen.groups if seen else [])}
        g = groups.get("default")
        return bool(g and g.serving and set(g.serving) == {ref} and g.applied and not g.error)

    return check


async def stream_seqs(js: Any, stream: str) -> list[int]:
    info = await js.stream_info(stream)
    state = info.state
    assert state.messages == state.last_seq - state.first_seq + 1 or state.messages == 0
    return list(range(state.first_seq, state.last_seq + 1)) if state.messages else []


async def sourced_seqs(js: Any) -> list[int]:
    """The device stream's sequence of every message in the hub's fleet stream (from the
    ``Nats-Stream-Source`` header JetStream's sourcing writes), in the hub's order."""
    info = await js.stream_info(S.fleet_results_stream)
    seqs = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(S.fleet_results_stream, seq)
        heads = {dest.rsplit(".", 1)[0] for _, dest in S.fleet_transforms(DEVICE)}
        assert msg.subject.rsplit(".", 1)[0] in heads, msg.subject  # the device in the subject
        seqs.append(int((msg.headers or {})["Nats-Stream-Source"].split()[1]))
    return seqs


@pytest.mark.slow
async def test_device_works_offline_and_catches_up(
    leaf: LeafPair, start_service, demo_models, tmp_path: Path
) -> None:
    hub_url, dev_url = leaf.hub.url, leaf.device.url
    hub_dep = start_service("deployer", hub_url, work_dir=tmp_path / "hub-dep", fleet_hub="true")
    dev_dep = start_service(
        "deployer",
        dev_url,
        work_dir=tmp_path / "dev-dep",
        fleet_device=DEVICE,
        fleet_seen_s=1.0,
        fleet_retry_max_s=2.0,
    )
    pub = start_service("publisher", dev_url)
    inf = start_service("inference", dev_url, group="default", model_cache=tmp_path / "cache")
    for proc in (hub_dep, dev_dep, pub):
        proc.wait_healthy(60)
    v1 = version_of(demo_models[YOLO], tmp_path / "v1", "f1")
    v2 = version_of(demo_models[YOLO], tmp_path / "v2", "f2")
    hub = await nats_py.connect(hub_url)
    dc = await DeployClient.connect(hub_url, timeout_s=30)
    try:
        await leaf.linked(hub)
        for pkg in (v1, v2):
            await dc.upload(pkg)
        await dc.fleet_add(DEVICE)
        frames = await Counter().start(hub, S.all_frames())
        model_frames = await Counter().start(hub, S.all_model_frames())
        await dc.fleet_deploy([DEVICE], "default", MODEL, "f1")
        await wait_for(lambda: _report_is(dc, serving("f1")), 120, "the device serving f1")
        cap = start_service(
            "capture", dev_url, camera="cam1", source=photos(tmp_path), fps=4, loop="true"
        )
        hjs = hub.jetstream()
        await wait_for(lambda: _fleet_count(hjs, 8), 90, "device results in the hub's stream")
        assert frames.subjects == [] and model_frames.subjects == [], "frames crossed the link"

        # ---- the link cut: the device keeps working, the hub deploys f2 meanwhile
        leaf.cut()
        dev = await nats_py.connect(dev_url, max_reconnect_attempts=-1)
        djs = dev.jetstream()
        before = len(await stream_seqs(djs, S.results_stream))
        hub_before = (await hjs.stream_info(S.fleet_results_stream)).state.messages
        await dc.fleet_deploy([DEVICE], "default", MODEL, "f2")
        outage_s = 60.0  # the outage: results pile up on the device all the while
        await asyncio.sleep(outage_s)  # the outage itself is the thing measured here
        during = len(await stream_seqs(djs, S.results_stream)) - before
        assert during >= outage_s, f"only {during} results stored on the device while cut off"
        assert (await hjs.stream_info(S.fleet_results_stream)).state.messages <= hub_before + 2
        await dev.close()

        # ---- the link back: every result once at the hub, f2 applied
        leaf.restore()
        await leaf.linked(hub, 60)
        await wait_for(lambda: _report_is(dc, serving("f2")), 120, "the device serving f2")
        cap.stop()
        dev = await nats_py.connect(dev_url)
        djs = dev.jetstream()

        async def every_one_once() -> bool:  # the device's stream settles once capture stops
            device = await stream_seqs(djs, S.results_stream)
            return bool(device) and sorted(await sourced_seqs(hjs)) == device

        with contextlib.suppress(AssertionError):  # the asserts below say what is wrong
            await wait_for(every_one_once, 60, "every device result at the hub")
        device_seqs = await stream_seqs(djs, S.results_stream)
        hub_seqs = await sourced_seqs(hjs)
        assert len(hub_seqs) == len(set(hub_seqs)), "a result sourced twice"
        assert sorted(hub_seqs) == device_seqs, "results missing at the hub"
        versions = await _versions_after_restore(djs)
        assert "f2" in versions, versions
        report = await device_report(dc)
        assert report is not None and report.results_lag == 0 and report.seen is not None
        print(
            f"fleet: {len(device_seqs)} results, {during} made during a {outage_s:g} s outage, "
            f"all at the hub once; device failures counted: {report.seen.failures}"
        )
        await dev.close()
    finally:
        await dc.close()
        await hub.close()
    assert dev_dep.metric("lensbus_deployer_fleet_applied_total") == 2
    assert dev_dep.metric("lensbus_deployer_fleet_failures_total", 'stage="link"') >= 1
    assert dev_dep.metric("lensbus_deployer_fleet_copy_bytes_total") > 0
    # Whether the hub's watch restarted the device's sources depends on whether nats-server's
    # own retry brought them back first (a CI run saw 0 restarts after a 15 s outage, every
    # result at the hub all the same); test_hub_watch_heals_sources_one_deployer_at_a_time
    # checks the watch itself.
    restarts = hub_dep.metric("lensbus_deployer_fleet_source_restarts_total")
    print(f"fleet: the hub's watch restarted the device's sources {restarts:g} time(s)")
    for proc in (inf, pub, dev_dep, hub_dep):
        assert proc.stop() == 0


async def _report_is(dc: DeployClient, check: Callable[[FleetDeviceStatus | None], bool]) -> bool:
    try:
        return check(await device_report(dc))
    except DeployError:
        return False


async def _fleet_count(js: Any, n: int) -> bool:
    try:
        return (await js.stream_info(S.fleet_results_stream)).state.messages >= n
    except Exception:
        return False


async def _versions_after_restore(js: Any) -> set[str]:
    """The model versions of the device's newest results (msgpack ``model.version``)."""
    from lensbus.codec import decode
    from lensbus.schemas import Result

    info = await js.stream_info(S.results_stream)
    versions = set()
    for seq in range(max(info.state.first_seq, info.state.last_seq - 5), info.state.last_seq + 1):
        msg = await js.get_msg(S.results_stream, seq)
        if ".results." in msg.subject:
            versions.add(decode(msg.data, Result).model.version)
    return versions
