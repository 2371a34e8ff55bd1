"""Deployer lifecycle: connect, bind or create the buckets, serve the API, watch swap reports
for failures (automatic rollback), keep /healthz honest about JetStream, drain, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import APIError, ServiceUnavailableError
from nats.js.kv import KeyValue

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode, encode
from lensbus.modelpkg import PackageError, open_package, sha256_file
from lensbus.runtime import Runtime
from lensbus.schemas import (
    ActivateRequest,
    Deployment,
    DeploymentReply,
    GroupStatus,
    ListReply,
    ListRequest,
    Message,
    ModelReply,
    ModelVersionRef,
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
from lensbus.schemas.deploy import UPLOAD_CHUNK_BYTES, object_name
from lensbus.subjects import (
    DEPLOYER_QUEUE_GROUP,
    DEPLOYER_VERBS,
    DEPLOYMENTS_BUCKET,
    MODELS_BUCKET,
)
from lensbus_deployer import handlers, metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.handlers import Heartbeat, Refused
from lensbus_deployer.store import REPORT_PATTERN, StaleRecord, Store
from lensbus_deployer.uploads import Upload, Uploads, human_bytes

log = logging.getLogger(__name__)

# Deployers share the API (all verbs but the chunks and commit of an upload, which must
# reach the deployer holding the upload's file) in this queue group.
# Verbs every deployer receives; only the owner of the upload answers.
OWNER_VERBS = frozenset({"upload_chunk", "upload_commit"})
# Attempts at a compare-and-set write of a group's record before giving up.
CAS_ATTEMPTS = 10
# A heartbeat not renewed for this long is forgotten.
HEARTBEAT_FORGET_NS = 3600 * 10**9

Handler = Callable[[Any], Awaitable[Reply | None]]


def jetstream_problem(exc: BaseException) -> str:
    """What a failed JetStream call says about JetStream, for /healthz and replies."""
    if isinstance(exc, ServiceUnavailableError | nats.errors.NoRespondersError):
        return "JetStream does not answer: not enabled on this NATS server, or not ready yet"
    if isinstance(exc, TimeoutError):
        return "JetStream did not answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Deployer:
    """The API handlers and background work of one deployer instance."""

    def __init__(self, settings: DeployerSettings, rt: Runtime) -> None:
        self.s = settings
        self.rt = rt
        self.store = Store(rt.nc.jetstream(timeout=settings.request_timeout_s), settings)
        self.uploads = Uploads(
            settings.work_dir,
            settings.instance,
            settings.max_uploads,
            settings.max_package_bytes,
            settings.upload_idle_timeout_s,
        )
        self.heartbeats: dict[str, Heartbeat] = {}
        self.counts = {"uploads": 0, "activations": 0, "rollbacks": 0, "models": 0}
        self._routes: dict[str, tuple[type[Message], type[Reply], Handler]] = {
            "upload_begin": (UploadBegin, UploadStarted, self.upload_begin),
            "upload_chunk": (UploadChunk, Reply, self.upload_chunk),
            "upload_commit": (UploadCommit, ModelReply, self.upload_commit),
            "list": (ListRequest, ListReply, self.list),
            "activate": (ActivateRequest, DeploymentReply, self.activate),
            "rollback": (RollbackRequest, DeploymentReply, self.rollback),
            "status": (StatusRequest, StatusReply, self.status),
        }
        assert set(self._routes) == set(DEPLOYER_VERBS)
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._watch: asyncio.Task[None] | None = None
        self._ensured_at_reconnects: int | None = None
        self._js_problem: str | None = "not checked yet"
        rt.health.set("jetstream", self._js_problem)
        self._listening_since = time.monotonic()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.uploads.prepare)
        nc = self.rt.nc
        for verb in DEPLOYER_VERBS:
            subject = self.rt.subjects.deployer_api(verb)
            queue = "" if verb in OWNER_VERBS else DEPLOYER_QUEUE_GROUP
            self._subs.append(await nc.subscribe(subject, queue=queue, cb=self._spawn(verb)))
        self._subs.append(await nc.subscribe(self.rt.subjects.all_status(), cb=self._on_status))
        self._listening_since = time.monotonic()
        log.info(
            "deployer API on %s (queue group %r); store %s, deployments %s",
            self.rt.subjects.deployer_api("list").rsplit(".", 1)[0] + ".*",
            DEPLOYER_QUEUE_GROUP,
            MODELS_BUCKET,
            DEPLOYMENTS_BUCKET,
        )

    async def stop(self) -> None:
        """Stop taking requests, let those in hand finish (within the drain limit)."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.s.drain_timeout_s)
        await self._stop_watch()
        self.uploads.close()
        metrics.UPLOADS_IN_PROGRESS.set(0)

    async def run(self) -> None:
        """Background work until stopped: JetStream health, buckets, watcher, housekeeping."""
        last_sweep = 0.0
        last_orphans = float("-inf")
        while not self.rt.stop.is_set():
            await self._check_jetstream()
            now = time.monotonic()
            for upload in self.uploads.expire():
                metrics.UPLOADS.labels("expired").inc()
                log.debug("expired %s", upload.id)
            metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
            if now - last_sweep > self.s.upload_idle_timeout_s / 2:
                last_sweep = now
                await asyncio.to_thread(self.uploads.sweep)
            if self._js_problem is None and now - last_orphans >= self.s.orphan_grace_s:
                last_orphans = now
                await self._housekeeping()
            self._forget_heartbeats()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stop.wait(), self.s.jetstream_check_s)

    def _set_jetstream(self, problem: str | None) -> None:
        if problem != self._js_problem:
            if problem is None:
                log.info("JetStream available; buckets %s and %s ready", MODELS_BUCKET,
                         DEPLOYMENTS_BUCKET)  # fmt: skip
            else:
                log.warning("JetStream unavailable: %s", problem)
        self._js_problem = problem
        self.rt.health.set("jetstream", problem)
        metrics.JETSTREAM_UP.set(1 if problem is None else 0)

    async def _check_jetstream(self) -> None:
        nc = self.rt.bus.nc
        if nc is None or not nc.is_connected:
            self._set_jetstream("not connected to NATS")
            return
        reconnects = int(nc.stats.get("reconnects", 0))
        try:
            await asyncio.wait_for(self.store.js.account_info(), self.s.request_timeout_s)
            fresh = not self.store.ready or reconnects != self._ensured_at_reconnects
            if fresh:
                await asyncio.wait_for(self.store.ensure(), self.s.request_timeout_s * 2)
            if fresh or self._watch is None or self._watch.done():
                # A watcher's consumer does not survive a NATS restart: start a new one.
                await self._start_watch()
                self._ensured_at_reconnects = reconnects
                await self._update_gauges()
        except Exception as exc:  # any failure here means: not usable now, try again
            self._set_jetstream(jetstream_problem(exc))
            return
        self._set_jetstream(None)

    async def _update_gauges(self) -> None:
        models = await self.store.list_models()
        self.counts["models"] = len(models)
        metrics.MODELS_STORED.set(len(models))
        with contextlib.suppress(Exception):
            metrics.STORE_BYTES.set(await self.store.store_bytes())

    async def _housekeeping(self) -> None:
        try:
            purged = await self.store.purge_orphans(self.s.orphan_grace_s)
            if purged:
                metrics.ORPHAN_CHUNKS_PURGED.inc(purged)
                await self._update_gauges()
        except Exception as exc:
            log.warning("could not check the store for incomplete objects: %s", exc)

    def _forget_heartbeats(self) -> None:
        cutoff = time.time_ns() - HEARTBEAT_FORGET_NS
        for name in [n for n, hb in self.heartbeats.items() if hb.received_ns < cutoff]:
            del self.heartbeats[name]

    # ---- automatic rollback ----------------------------------------------------------------

    async def _start_watch(self) -> None:
        await self._stop_watch()
        watcher = await self.store.kv.watch(REPORT_PATTERN)
        self._watch = asyncio.create_task(self._follow_reports(watcher), name="report-watch")

    async def _stop_watch(self) -> None:
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _follow_reports(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            while True:
                entry = await watcher.updates(timeout=None)
                if entry is None or not entry.value or entry.operation is not None:
                    continue
                try:
                    report = decode(entry.value, SwapReport)
                except DecodeError as exc:
                    shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
                    log.warning("unreadable swap report %s: %s", entry.key, exc)
                    continue
                if report.state == "failed":
                    try:
                        await self._on_failure(report, entry.revision or 0)
                    except Exception as exc:  # retried when the watcher restarts
                        log.error("could not act on the failure of %s in group %s: %s",
                                  report.desired.ref, report.group, exc)  # fmt: skip
                        raise
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _on_failure(self, report: SwapReport, revision: int) -> None:
        """Roll the group back if the report is about its current desired model."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.store.deployment(report.group)
            if current.deployment is None or current.revision > revision:
                return  # the report predates the group's current record
            new = handlers.auto_rollback(current.deployment, report, time.time_ns())
            if new is None:
                return
            try:
                await self.store.write(new, current.revision)
            except StaleRecord:
                continue
            metrics.DEPLOYMENTS_FAILED.inc()
            if new.state == "rolled_back":
                metrics.ROLLBACKS.labels("automatic").inc()
                self.counts["rollbacks"] += 1
            log.warning("group %s: %s", new.group, new.reason)
            return
        log.error("group %s changed too often to record the failure of %s",
                  report.group, report.desired.ref)  # fmt: skip

    # ---- heartbeats --------------------------------------------------------------------------

    async def _on_status(self, msg: Msg) -> None:
        try:
            status = decode(msg.data, Status)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            return
        if status.service == handlers.INFERENCE_SERVICE:
            self.heartbeats[status.instance] = Heartbeat(status, time.time_ns())

    # ---- request dispatch --------------------------------------------------------------------

    def _spawn(self, verb: str) -> Callable[[Msg], Awaitable[None]]:
        async def cb(msg: Msg) -> None:
            # One task per request: a commit (seconds for a big package) must not hold up
            # the requests behind it on the same subscription.
            task = asyncio.create_task(self._on_request(verb, msg))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return cb

    async def _on_request(self, verb: str, msg: Msg) -> None:
        request_cls, reply_cls, handler = self._routes[verb]
        t0 = time.perf_counter()
        if not msg.reply:
            shared_metrics.MESSAGES_REJECTED.labels("no_reply_subject").inc()
            return
        reply: Reply | None
        try:
            request = decode(msg.data, request_cls)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            reply = reply_cls(ok=False, code="bad_request", error=f"bad {verb} request: {exc}")
        else:
            try:
                reply = await handler(request)
            except Refused as exc:
                reply = reply_cls(ok=False, code=exc.code, error=exc.message)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.warning("%s failed: %s: %s", verb, type(exc).__name__, exc)
                reply = reply_cls(
                    ok=False,
                    code="internal",
                    error=f"the deployer could not reach JetStream ({type(exc).__name__}: "
                    f"{exc}); try again, and check nats-server if it persists",
                )
            except Exception as exc:
                log.exception("%s failed", verb)
                reply = reply_cls(
                    ok=False, code="internal", error=f"deployer error: {type(exc).__name__}: {exc}"
                )
            if reply is None:
                return  # another deployer's upload: it answers
        metrics.REQUESTS.labels(verb, reply.code or "ok").inc()
        metrics.REQUEST_SECONDS.labels(verb).observe(time.perf_counter() - t0)
        try:
            await msg.respond(encode(reply))
        except Exception as exc:  # the requester is gone, or we are closing
            log.debug("reply to %s not sent: %s", verb, exc)

    def _require_store(self) -> Store:
        if self._js_problem is not None or not self.store.ready:
            raise Refused(
                "internal",
                f"the deployer cannot use JetStream now ({self._js_problem}); "
                "check that nats-server runs with JetStream enabled (-js) and has storage",
            )
        return self.store

    # ---- uploads -----------------------------------------------------------------------------

    async def upload_begin(self, req: UploadBegin) -> UploadStarted:
        self._require_store()
        try:
            upload = self.uploads.begin(req.size, req.sha256)
        except Refused as exc:
            metrics.UPLOADS.labels("refused").inc()
            raise exc
        metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
        log.info("upload %s started: %s", upload.id, human_bytes(req.size))
        return UploadStarted(upload_id=upload.id, chunk_bytes=UPLOAD_CHUNK_BYTES)

    async def upload_chunk(self, req: UploadChunk) -> Reply | None:
        if not self.uploads.owns(req.upload_id):
            return None
        upload = self.uploads.get(req.upload_id)
        async with upload.lock:
            await self.uploads.write(upload, req.offset, req.data)
        metrics.UPLOAD_BYTES.inc(len(req.data))
        return Reply()

    async def upload_commit(self, req: UploadCommit) -> ModelReply | None:
        if not self.uploads.owns(req.upload_id):
            return None
        upload = self.uploads.get(req.upload_id)
        async with upload.lock:
            upload = self.uploads.take(req.upload_id)
        metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
        t0 = time.perf_counter()
        try:
            reply = await self._commit(upload)
        except Refused as exc:
            outcome = {"invalid_package": "invalid_package", "conflict": "conflict",
                       "bad_request": "corrupt"}  # fmt: skip
            metrics.UPLOADS.labels(outcome.get(exc.code, "error")).inc()
            log.warning("upload %s refused: %s", upload.id, exc.message)
            raise
        except Exception:
            metrics.UPLOADS.labels("error").inc()
            raise
        finally:
            await asyncio.to_thread(upload.discard)
        metrics.UPLOADS.labels("created" if reply.created else "identical").inc()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - t0)
        return reply

    async def _commit(self, upload: Upload) -> ModelReply:
        store = self._require_store()
        if upload.received != upload.size:
            raise Refused(
                "bad_request",
                f"incomplete upload: {upload.received} of {upload.size} bytes arrived; "
                "upload the package again",
            )
        digest = await asyncio.to_thread(sha256_file, upload.path)
        if digest != upload.sha256:
            raise Refused(
                "bad_request",
                f"upload corrupted in transit: the bytes received have sha256 {digest[:12]}..., "
                f"the client announced {upload.sha256[:12]}...; upload the package again",
            )
        unpack = self.uploads.unpack_dir / upload.path.stem
        self.uploads.busy.add(unpack)
        try:
            package = await asyncio.to_thread(
                open_package, upload.path, unpack, self.s.max_package_bytes
            )
        except PackageError as exc:
            raise Refused("invalid_package", self._package_error(exc, upload, unpack)) from None
        finally:
            self.uploads.busy.discard(unpack)
            await asyncio.to_thread(shutil.rmtree, unpack, True)
        manifest = package.manifest
        content = handlers.content_sha256(manifest)
        name = object_name(manifest.name, manifest.version)
        lock = self._model_locks.setdefault(name, asyncio.Lock())
        async with lock:
            existing = await store.model(manifest.name, manifest.version)
            if existing is not None:
                info, existing_content = existing
                if existing_content == content:
                    log.info("%s uploaded again, identical: kept the stored one", manifest.ref)
                    return ModelReply(model=info, created=False)
                raise Refused(
                    "conflict",
                    f"{manifest.ref} is already stored with different content "
                    f"(sha256 {info.sha256[:12]}..., {human_bytes(info.size)}); a version "
                    "never changes: give the new package another version in model.json",
                )
            try:
                info = await store.put_model(manifest, upload.path, digest, content)
            except APIError as exc:  # e.g. the store is full (its limit, or the disk's)
                raise Refused(
                    "internal",
                    f"the model store did not take {manifest.ref} "
                    f"({exc.description or type(exc).__name__}); if it is full, raise the "
                    f"limit of the stream OBJ_{MODELS_BUCKET} or free space",
                ) from None
        self.counts["uploads"] += 1
        log.info("stored %s: %s, sha256 %s", manifest.ref, human_bytes(info.size), digest[:12])
        with contextlib.suppress(Exception):
            await self._update_gauges()
        return ModelReply(model=info, created=True)

    def _package_error(self, exc: PackageError, upload: Upload, unpack: Any) -> str:
        """The checker's reason, without this deployer's temporary paths in it."""
        text = str(exc).replace(f"{unpack}/", "").replace(str(unpack), "the package")
        text = text.replace(upload.path.name, "the archive")
        if str(self.s.max_package_bytes) in text:
            text += " (the deployer's LENSBUS_DEPLOYER_MAX_PACKAGE_BYTES)"
        return f"invalid package: {text}"

    # ---- models and deployments -------------------------------------------------------------

    async def list(self, req: ListRequest) -> ListReply:
        models = await self._require_store().list_models()
        if req.name is not None:
            models = [m for m in models if m.name == req.name]
        return ListReply(models=models)

    async def _update(
        self, group: str, change: Callable[[Deployment | None], Deployment]
    ) -> Deployment:
        """Compare-and-set the group's record (another deployer may write it too)."""
        store = self._require_store()
        for _ in range(CAS_ATTEMPTS):
            current = await store.deployment(group)
            new = change(current.deployment)
            try:
                await store.write(new, current.revision)
            except StaleRecord:
                continue
            return new
        raise Refused("internal", f"group {group!r} changed too often; try again")

    async def activate(self, req: ActivateRequest) -> DeploymentReply:
        store = self._require_store()
        if req.version is not None:
            found = await store.model(req.name, req.version)
            if found is None:
                versions = [m.version for m in await store.list_models() if m.name == req.name]
                known = f"stored versions: {', '.join(versions)}" if versions else "none stored"
                raise Refused(
                    "not_found",
                    f"no model {req.name}:{req.version} in the store ({known}); "
                    "upload it first (lensbus models upload PATH)",
                )
            version = req.version
        else:
            newest = handlers.latest(await store.list_models(), req.name)
            if newest is None:
                raise Refused(
                    "not_found",
                    f"no model named {req.name!r} in the store; upload it first "
                    "(lensbus models upload PATH) or see lensbus models list",
                )
            version = newest.version
        ref = ModelVersionRef(name=req.name, version=version)
        now = time.time_ns()
        dep = await self._update(req.group, lambda cur: handlers.activate(cur, req.group, ref, now))
        metrics.ACTIVATIONS.inc()
        self.counts["activations"] += 1
        log.info("group %s: desired model %s", req.group, ref.ref)
        return DeploymentReply(deployment=dep)

    async def rollback(self, req: RollbackRequest) -> DeploymentReply:
        now = time.time_ns()
        dep = await self._update(req.group, lambda cur: handlers.rollback(cur, req.group, now))
        metrics.ROLLBACKS.labels("manual").inc()
        self.counts["rollbacks"] += 1
        log.info("group %s: %s", req.group, dep.reason)
        return DeploymentReply(deployment=dep)

    async def status(self, req: StatusRequest) -> StatusReply:
        store = self._require_store()
        deployments, reports = await asyncio.gather(store.deployments(), store.reports())
        settled = time.monotonic() - self._listening_since > 10.0
        groups = handlers.group_statuses(
            deployments, reports, self.heartbeats.values(), time.time_ns(), settled, req.group
        )
        if req.group is not None and not groups:
            groups = [GroupStatus(group=req.group)]
        return StatusReply(groups=groups)


async def run(settings: DeployerSettings) -> int:
    deployer: Deployer | None = None

    def counters() -> dict[str, float]:
        return {k: float(v) for k, v in deployer.counts.items()} if deployer else {}

    async with Runtime(settings, counters=counters) as rt:
        if rt.bus.nc is None:  # stopped before NATS was reached
            return 0
        deployer = Deployer(settings, rt)
        await deployer.start()
        rt.set_state("running")
        background = asyncio.create_task(deployer.run(), name="deployer")
        try:
            await rt.stop.wait()
        finally:
            log.info("stopping: finishing requests in hand")
            await deployer.stop()
            background.cancel()
            with contextlib.suppress(BaseException):
                await background
    return 0
