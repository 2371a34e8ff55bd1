"""``lensbus.jetstream``: creating JetStream resources with a replica count and keeping the
fields their owner names in place. The pure parts, then a real single nats-server (a count
above 1 is refused naming the setting; limits updated in place). The in-place R1 -> R3
update on a real cluster is in ``tests/test_cluster.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats as nats_py
import pytest
from nats.js import api

from lensbus.jetstream import (
    KV_FIELDS,
    ReplicasError,
    bucket_wanted,
    changes,
    describe,
    ensure_key_value,
    ensure_object_store,
    ensure_stream,
    updated,
    wanted,
)
from lensbus.natsserver import NatsServer

# ---- pure -------------------------------------------------------------------------------------


def test_changes_names_only_owned_fields_that_differ() -> None:
    have = api.StreamConfig(name="S", subjects=["a.*", "b.*"], max_age=60.0, num_replicas=1)
    assert changes(have, {"subjects": ["b.*", "a.*"], "max_age": 60.0}) == {}
    assert changes(have, {"max_age": 120.0}) == {"max_age": (60.0, 120.0)}
    assert changes(have, {"num_replicas": 3}) == {"num_replicas": (1, 3)}
    # the server's defaults: no replica count is 1, no age limit is 0
    assert changes(api.StreamConfig(name="S"), {"num_replicas": 1, "max_age": 0}) == {}


def test_updated_keeps_every_other_field() -> None:
    have = api.StreamConfig(
        name="KV_b", subjects=["$KV.b.>"], allow_rollup_hdrs=True, max_msgs_per_subject=5
    )
    new = updated(have, {"num_replicas": (1, 3)})
    assert new.num_replicas == 3 and new.allow_rollup_hdrs and new.max_msgs_per_subject == 5
    assert have.num_replicas is None  # the server's copy is not changed
    assert describe({"num_replicas": (1, 3), "max_age": (60, 120)}) == (
        "num_replicas 1 -> 3, max_age 60 -> 120"
    )


def test_wanted_maps_bucket_settings_to_stream_fields() -> None:
    kv = api.KeyValueConfig(bucket="b", history=5, max_value_size=1024)
    assert bucket_wanted(kv, KV_FIELDS, ("history", "max_value_size"), 3) == {
        "max_msgs_per_subject": 5,
        "max_msg_size": 1024,
        "num_replicas": 3,
    }
    assert bucket_wanted(kv, KV_FIELDS, (), None) == {}  # not the caller's to decide
    stream = api.StreamConfig(name="S", max_age=5.0)
    assert wanted(stream, ("max_age",), 1) == {"max_age": 5.0, "num_replicas": 1}


def test_replicas_error_names_the_setting() -> None:
    err = ReplicasError("stream S", 3, "replicas > 1 not supported in non-clustered mode")
    assert "jetstream_replicas=3" in str(err) and "JETSTREAM_REPLICAS" in str(err)
    assert "stream S" in str(err) and isinstance(err, ValueError)


# ---- a real server ----------------------------------------------------------------------------


@pytest.fixture
async def js(fresh_nats: NatsServer) -> AsyncIterator[nats_py.js.JetStreamContext]:
    nc = await nats_py.connect(fresh_nats.url)
    yield nc.jetstream(timeout=5)
    await nc.close()


async def test_single_server_refuses_more_replicas_naming_the_setting(js) -> None:  # type: ignore[no-untyped-def]
    config = api.KeyValueConfig(bucket="r3", history=1)
    with pytest.raises(ReplicasError, match="jetstream_replicas=3"):
        await ensure_key_value(js, config, replicas=3)
    await ensure_key_value(js, config, replicas=1)  # made at R1
    with pytest.raises(ReplicasError, match="non-clustered"):  # and not raised to R3 either
        await ensure_key_value(js, config, replicas=3)
    with pytest.raises(ReplicasError, match="jetstream_replicas"):
        await ensure_object_store(js, "obj3", api.ObjectStoreConfig(), replicas=3)
    stream = api.StreamConfig(name="S3", subjects=["s3.>"])
    with pytest.raises(ReplicasError, match="stream S3"):
        await ensure_stream(js, stream, replicas=3)


async def test_owned_limits_updated_in_place_and_logged(js, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "lensbus.jetstream")
    config = api.StreamConfig(name="LIM", subjects=["lim.a"], max_age=60.0, max_bytes=10_000)
    await ensure_stream(js, config, ("subjects", "max_age"), replicas=1)
    await js.publish("lim.a", b"kept")
    wider = api.StreamConfig(name="LIM", subjects=["lim.a", "lim.b"], max_age=120.0)
    await ensure_stream(js, wider, ("subjects", "max_age"), replicas=1)
    info = await js.stream_info("LIM")
    assert info.config.max_age == 120.0 and sorted(info.config.subjects or []) == [
        "lim.a",
        "lim.b",
    ]
    assert info.config.max_bytes == 10_000  # not owned: left as it was
    assert info.state.messages == 1  # updated, not made again
    updates = [r.getMessage() for r in caplog.records if "updated" in r.getMessage()]
    assert updates == [
        "updated stream LIM in place: subjects ['lim.a'] -> ['lim.a', 'lim.b'], "
        "max_age 60.0 -> 120.0"
    ]
    await ensure_stream(js, wider, ("subjects", "max_age"), replicas=1)  # nothing to change
    assert len([r for r in caplog.records if "updated" in r.getMessage()]) == 1


async def test_buckets_bound_as_they_are_unless_owned(js) -> None:  # type: ignore[no-untyped-def]
    kv = await ensure_key_value(js, api.KeyValueConfig(bucket="kvb", history=2), replicas=None)
    await kv.put("k", b"v1")
    # another history, not owned: bound as it is; owned: updated in place, value kept
    await ensure_key_value(js, api.KeyValueConfig(bucket="kvb", history=5), replicas=1)
    assert (await js.stream_info("KV_kvb")).config.max_msgs_per_subject == 2
    kv = await ensure_key_value(
        js, api.KeyValueConfig(bucket="kvb", history=5), ("history",), replicas=1
    )
    assert (await js.stream_info("KV_kvb")).config.max_msgs_per_subject == 5
    assert (await kv.get("k")).value == b"v1"
    store = await ensure_object_store(
        js, "objb", api.ObjectStoreConfig(max_bytes=1 << 20), replicas=None
    )
    await store.put("o", b"data")
    again = await ensure_object_store(js, "objb", api.ObjectStoreConfig(), replicas=1)
    assert (await again.get("o")).data == b"data"
    assert (await js.stream_info("OBJ_objb")).config.max_bytes == 1 << 20


@pytest.mark.slow
async def test_a_service_with_too_many_replicas_says_which_setting(
    fresh_nats: NatsServer, start_service, tmp_path: Path
) -> None:
    """The deployer asked for R3 on a single server: /healthz names the setting."""
    dep = start_service("deployer", fresh_nats.url, work_dir=tmp_path / "dep", jetstream_replicas=3)
    deadline = time.monotonic() + 30
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            code, body = dep.healthz()
        except OSError:
            code = 0
        if code == 503 and "jetstream_replicas" in json.dumps(body):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"/healthz did not name jetstream_replicas: {body}\n{dep.log}")
    assert "jetstream_replicas=3" in dep.log
