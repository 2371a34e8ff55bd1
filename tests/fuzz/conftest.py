"""The fuzz tests write hostile records into the cameras and deployments buckets and send
made-up heartbeats: each test gets a nats-server of its own (``fresh_nats``), so none of it
is left for the other tests, whose buckets would otherwise hold it (the bucket names do not
follow the subject prefix yet)."""

from __future__ import annotations

import pytest

from lensbus.natsserver import NatsServer


@pytest.fixture
def nats(fresh_nats: NatsServer) -> NatsServer:
    return fresh_nats
