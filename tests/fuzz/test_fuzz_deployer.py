"""Fuzzing the deployer: hostile request bodies on every API verb, heartbeats and swap
reports, and malformed model archives (damaged, escaping, linking out, claiming huge sizes,
very many files, a gzip bomb) through the real upload; every bad request answered
`bad_request` and counted by reason, no `internal` answer, the process serving with its
memory bounded, and a real package still uploads and activates afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats as nats_py
import pytest
from fuzz_payloads import STATUS, SWAP_REPORT, bad_archive, empty_archive, hostile, requests
from fuzz_probe import (
    INPUT_REASONS,
    Tally,
    assert_serving,
    delta,
    expected_reason,
    fuzz_settings,
    memory,
    rejects,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st

from lensbus import Subjects
from lensbus.codec import decode
from lensbus.deployclient import DeployClient
from lensbus.errors import DeployError
from lensbus.modelpkg import pack
from lensbus.natsserver import NatsServer
from lensbus.processes import ServiceProcess
from lensbus.schemas import (
    ActivateRequest,
    DeploymentReply,
    ListReply,
    ListRequest,
    Message,
    ModelReply,
    Reply,
    RollbackRequest,
    Status,
    StatusReply,
    StatusRequest,
    SwapReport,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    UploadStarted,
)
from lensbus.subjects import DEPLOYMENTS_BUCKET

FACE = "face-ssd-opencv"
S = Subjects()
VERBS: dict[str, tuple[type[Message], type[Reply]]] = {
    "upload_begin": (UploadBegin, UploadStarted),
    "upload_chunk": (UploadChunk, Reply),
    "upload_commit": (UploadCommit, ModelReply),
    "list": (ListRequest, ListReply),
    "activate": (ActivateRequest, DeploymentReply),
    "rollback": (RollbackRequest, DeploymentReply),
    "status": (StatusRequest, StatusReply),
}
OWNER = "fuzzdep"  # the deployer's instance id: upload ids it owns start with it
REQUESTS = requests(OWNER)
API = st.sampled_from(sorted(REQUESTS)).flatmap(
    lambda verb: st.tuples(st.just(verb), hostile(REQUESTS[verb]))
)


def foreign(verb: str, data: bytes) -> bool:
    """A readable chunk or commit of an upload another deployer took: this one stays silent
    (the owner answers), so the request times out."""
    if verb not in ("upload_chunk", "upload_commit"):
        return False
    if expected_reason(data, VERBS[verb][0]) is not None:
        return False
    upload_id = decode(data, VERBS[verb][0]).upload_id
    return not upload_id.startswith(OWNER + ":") or upload_id.count(":") > 1


# Heartbeats on their own subject, and swap reports under their own key (checking them
# against where they came is the permissions work; here the payload is what is hostile).
HEARTBEATS = hostile(STATUS)
REPORTS = hostile(SWAP_REPORT)


def own_subject(data: bytes) -> str:
    if expected_reason(data, Status) is None:
        st_ = decode(data, Status)
        try:
            return S.status(st_.service, st_.instance)
        except ValueError:
            pass
    return S.status("fuzz", "f1")


async def api(dep: ServiceProcess, url: str, batch: list[tuple[str, bytes]]) -> None:
    """Each request answered: `bad_request` for what does not read, counted by its reason;
    never `internal`."""
    tally = Tally()
    before = rejects(dep)
    nc = await nats_py.connect(url)
    try:
        for verb, data in batch:
            request_cls, reply_cls = VERBS[verb]
            reason = expected_reason(data, request_cls)
            tally.add(reason)
            if foreign(verb, data):
                with pytest.raises(nats_py.errors.TimeoutError):
                    await nc.request(S.deployer_api(verb), data, timeout=0.3)
                continue
            try:
                msg = await nc.request(S.deployer_api(verb), data, timeout=30)
            except nats_py.errors.TimeoutError:
                raise AssertionError(f"no answer to {verb} {data[:200]!r}") from None
            reply = decode(msg.data, reply_cls)
            assert reply.code != "internal", (verb, reply)
            if reason is not None:
                assert (reply.ok, reply.code) == (False, "bad_request"), (verb, reply)
    finally:
        await nc.close()
    got = delta(rejects(dep), before)
    assert set(got) <= INPUT_REASONS, got
    # At least: heartbeats and reports of the batch before may still be being counted.
    for reason, n in tally.must_reject.items():
        assert got.get(reason, 0) >= n, (reason, got, tally)
    assert_serving(dep)


async def heartbeats_and_reports(
    dep: ServiceProcess, url: str, beats: list[bytes], reports: list[bytes]
) -> None:
    """Unreadable heartbeats and swap reports are counted by reason; the deployer serves."""
    tally = Tally()
    before = rejects(dep)
    nc = await nats_py.connect(url)
    try:
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        for data in beats:
            tally.add(expected_reason(data, Status))
            await nc.publish(own_subject(data), data)
        for n, data in enumerate(reports):
            try:
                await kv.put(f"report.fuzz.f{n}", data)
            except Exception:  # over the bucket's value size: the server refuses it
                continue
            if data:  # an empty value reads as a delete
                tally.add(expected_reason(data, SwapReport))
        await nc.flush()
    finally:
        await nc.close()

    def counted() -> bool:
        return sum(delta(rejects(dep), before).values()) >= tally.rejected

    await wait_for(counted, 30, f"{tally.rejected} rejects")
    got = delta(rejects(dep), before)
    assert set(got) <= INPUT_REASONS | {"subject_mismatch", "key_mismatch"}, got
    assert_serving(dep)


async def uploads(url: str, tmp: Path, archives: list[bytes]) -> None:
    """Each bad archive refused as `invalid_package` or `bad_request`, not `internal`."""
    async with await DeployClient.connect(url, timeout_s=60.0) as dc:
        for n, data in enumerate(archives):
            path = tmp / f"bad-{n}.tar.gz"
            path.write_bytes(data)
            with pytest.raises(DeployError) as info:
                await dc.upload(path)
            assert info.value.code in ("invalid_package", "bad_request"), info.value


async def good_upload(url: str, archive: Path) -> None:
    async with await DeployClient.connect(url, timeout_s=60.0) as dc:
        reply = await dc.upload(archive)
        assert reply.model is not None
        deployment = await dc.activate("fuzzgroup", reply.model.name, reply.model.version)
        assert deployment.model.version == reply.model.version


@pytest.mark.slow
# A failing batch is printed whole, however long.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
def test_hostile_requests_records_and_archives(
    nats: NatsServer, start_service, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    if FACE not in demo_models:
        pytest.skip("needs the face SSD demo package")
    good = tmp_path / "good.tar.gz"
    pack(demo_models[FACE], good)
    dep = start_service("deployer", nats.url, work_dir=tmp_path / "work", instance=OWNER)
    dep.wait_healthy(30)
    warm = memory(dep.pid)

    @fuzz_settings()
    @given(
        st.lists(API, min_size=8, max_size=30),
        st.lists(HEARTBEATS, max_size=10),
        st.lists(REPORTS, max_size=6),
        st.lists(bad_archive(good.read_bytes()), min_size=1, max_size=3),
    )
    def batches(
        calls: list[tuple[str, bytes]], beats: list[bytes], reports: list[bytes], bad: list[bytes]
    ) -> None:
        asyncio.run(api(dep, nats.url, calls))
        asyncio.run(heartbeats_and_reports(dep, nats.url, beats, reports))
        asyncio.run(uploads(nats.url, tmp_path, bad))

    batches()
    asyncio.run(good_upload(nats.url, good))
    peak = memory(dep.pid)
    assert peak.hwm_mb - warm.hwm_mb < 200, f"peak RSS {warm.hwm_mb:.0f} -> {peak.hwm_mb:.0f} MB"
    assert_serving(dep)
    assert dep.stop() == 0


@pytest.mark.slow
def test_an_empty_archive_is_an_invalid_package(
    nats: NatsServer, start_service, tmp_path: Path
) -> None:
    """Found by this suite: an archive without members was answered ``internal`` (the
    unpack folder was listed without ever being made)."""
    dep = start_service("deployer", nats.url, work_dir=tmp_path / "work", instance=OWNER)
    dep.wait_healthy(30)
    asyncio.run(uploads(nats.url, tmp_path, [empty_archive()]))
