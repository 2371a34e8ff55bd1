"""The deployer's request/reply API on ``<prefix>.api.deployer.<verb>``: a subscription per
verb, a task per request, a reply from what the verb returns or the :class:`Refused` it
raises; the model and deployment verbs (``list``, ``activate``, ``rollback``, ``status``);
and the inference heartbeats ``status`` reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lensbus import metrics as shared_metrics
from lensbus.codec import DecodeError, decode, encode
from lensbus.logs import RateLimit, log_limited
from lensbus.runtime import Runtime
from lensbus.schemas import (
    ActivateRequest,
    Deployment,
    DeploymentReply,
    FleetDeployReply,
    FleetDeployRequest,
    FleetDeviceReply,
    FleetDeviceRequest,
    FleetStatusReply,
    FleetStatusRequest,
    GroupStatus,
    ListReply,
    ListRequest,
    Message,
    ModelReply,
    ModelVersionRef,
    PipelineReply,
    PipelineRequest,
    PipelineSetRequest,
    ProjectDeployReply,
    ProjectDeployRequest,
    ProjectListReply,
    ProjectListRequest,
    ProjectRequest,
    ProjectStatusReply,
    ProjectStatusRequest,
    ProjectUploadReply,
    Reply,
    RollbackRequest,
    Status,
    StatusReply,
    StatusRequest,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    UploadStarted,
)
from lensbus.subjects import DEPLOYER_QUEUE_GROUP, DEPLOYER_VERBS, FLEET_VERBS
from lensbus_deployer import decisions, metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.decisions import Heartbeat
from lensbus_deployer.errors import Refused
from lensbus_deployer.fleet_verbs import FleetVerbs
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.model_objects import latest
from lensbus_deployer.pipeline_verbs import PipelineVerbs
from lensbus_deployer.project_verbs import ProjectVerbs
from lensbus_deployer.store import compare_and_set
from lensbus_deployer.upload_verbs import UploadVerbs

log = logging.getLogger(__name__)

# Deployers share the API (all verbs but the chunks and commit of an upload, which must
# reach the deployer holding the upload's file) in this queue group.
# Verbs every deployer receives; only the owner of the upload answers.
OWNER_VERBS = frozenset(
    {"upload_chunk", "upload_commit", "project_upload_chunk", "project_upload_commit"}
)
# A heartbeat not renewed for this long is forgotten.
HEARTBEAT_FORGET_NS = 3600 * 10**9

Handler = Callable[[Any], Awaitable[Reply | None]]


class Api:
    """The verbs of one deployer, and the subscriptions and tasks that answer them."""

    def __init__(
        self,
        settings: DeployerSettings,
        rt: Runtime,
        jetstream: JetStream,
        upload_verbs: UploadVerbs,
        counts: dict[str, int],
    ) -> None:
        self.s = settings
        self.rt = rt
        self.jetstream = jetstream
        self.counts = counts
        self.heartbeats: dict[str, Heartbeat] = {}
        up = upload_verbs
        self.pipelines = pv = PipelineVerbs(jetstream, self._update, counts)
        self.projects = pj = ProjectVerbs(settings, jetstream, upload_verbs, pv, self.activate)
        self._routes: dict[str, tuple[type[Message], type[Reply], Handler]] = {
            "upload_begin": (UploadBegin, UploadStarted, up.upload_begin),
            "upload_chunk": (UploadChunk, Reply, up.upload_chunk),
            "upload_commit": (UploadCommit, ModelReply, up.upload_commit),
            "list": (ListRequest, ListReply, self.list),
            "activate": (ActivateRequest, DeploymentReply, self.activate),
            "rollback": (RollbackRequest, DeploymentReply, self.rollback),
            "status": (StatusRequest, StatusReply, self.status),
            "pipeline_set": (PipelineSetRequest, PipelineReply, pv.pipeline_set),
            "pipeline_get": (PipelineRequest, PipelineReply, pv.pipeline_get),
            "pipeline_rollback": (PipelineRequest, PipelineReply, pv.pipeline_rollback),
            "project_upload_begin": (UploadBegin, UploadStarted, pj.upload_begin),
            "project_upload_chunk": (UploadChunk, Reply, pj.upload_chunk),
            "project_upload_commit": (UploadCommit, ProjectUploadReply, pj.upload_commit),
            "project_list": (ProjectListRequest, ProjectListReply, pj.project_list),
            "project_deploy": (ProjectDeployRequest, ProjectDeployReply, pj.project_deploy),
            "project_rollback": (ProjectRequest, ProjectDeployReply, pj.project_rollback),
            "project_remove": (ProjectRequest, ProjectDeployReply, pj.project_remove),
            "project_status": (ProjectStatusRequest, ProjectStatusReply, pj.project_status),
        }
        self.fleet = fl = FleetVerbs(settings, jetstream, self._version)
        self._routes |= {
            "fleet_add": (FleetDeviceRequest, FleetDeviceReply, fl.fleet_add),
            "fleet_remove": (FleetDeviceRequest, FleetDeviceReply, fl.fleet_remove),
            "fleet_deploy": (FleetDeployRequest, FleetDeployReply, fl.fleet_deploy),
            "fleet_status": (FleetStatusRequest, FleetStatusReply, fl.fleet_status),
        }
        assert set(self._routes) == {*DEPLOYER_VERBS, *FLEET_VERBS}
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._listening_since = time.monotonic()
        self._limit = RateLimit(60.0)

    async def start(self) -> None:
        nc = self.rt.nc
        for verb in (*DEPLOYER_VERBS, *FLEET_VERBS):
            subject = self.rt.subjects.deployer_api(verb)
            queue = "" if verb in OWNER_VERBS else DEPLOYER_QUEUE_GROUP
            self._subs.append(await nc.subscribe(subject, queue=queue, cb=self._spawn(verb)))
        self._subs.append(await nc.subscribe(self.rt.subjects.all_status(), cb=self._on_status))
        self._listening_since = time.monotonic()
        log.info(
            "deployer API on %s (queue group %r); store %s, deployments %s",
            self.rt.subjects.deployer_api("list").rsplit(".", 1)[0] + ".*",
            DEPLOYER_QUEUE_GROUP,
            self.rt.subjects.models_bucket,
            self.rt.subjects.deployments_bucket,
        )

    async def stop(self) -> None:
        """Stop taking requests, let those in hand finish (within the drain limit)."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.s.drain_timeout_s)

    # ---- heartbeats --------------------------------------------------------------------------

    async def _on_status(self, msg: Msg) -> None:
        try:
            status = decode(msg.data, Status)
        except DecodeError as exc:
            shared_metrics.MESSAGES_REJECTED.labels(exc.reason).inc()
            log_limited(log, self._limit, exc.reason, logging.WARNING, "bad heartbeat: %s", exc)
            return
        if not self.rt.subjects.status_matches(msg.subject, status.service, status.instance):
            # Only the subject is vouched for by the server's permissions.
            shared_metrics.MESSAGES_REJECTED.labels("subject_mismatch").inc()
            log_limited(
                log,
                self._limit,
                "subject_mismatch",
                logging.WARNING,
                "refused a heartbeat of %s.%s that came on %s",
                status.service,
                status.instance,
                msg.subject,
            )
            return
        if status.service == decisions.INFERENCE_SERVICE:
            self.heartbeats[status.instance] = Heartbeat(status, time.time_ns())

    def forget_heartbeats(self) -> None:
        cutoff = time.time_ns() - HEARTBEAT_FORGET_NS
        for name in [n for n, hb in self.heartbeats.items() if hb.received_ns < cutoff]:
            del self.heartbeats[name]

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
            reply = await self._answer(verb, reply_cls, handler, request)
            if reply is None:
                return  # another deployer's upload: it answers
        metrics.REQUESTS.labels(verb, reply.code or "ok").inc()
        metrics.REQUEST_SECONDS.labels(verb).observe(time.perf_counter() - t0)
        try:
            await msg.respond(encode(reply))
        except Exception as exc:  # the requester is gone, or we are closing
            log.debug("reply to %s not sent: %s", verb, exc)

    async def _answer(
        self, verb: str, reply_cls: type[Reply], handler: Handler, request: Message
    ) -> Reply | None:
        """The verb's reply, or a refusal or failure as a reply with its code."""
        try:
            return await handler(request)
        except Refused as exc:
            return reply_cls(ok=False, code=exc.code, error=exc.message)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            log.warning("%s failed: %s: %s", verb, type(exc).__name__, exc)
            return reply_cls(
                ok=False,
                code="internal",
                error=f"the deployer could not reach JetStream ({type(exc).__name__}: "
                f"{exc}); try again, and check nats-server if it persists",
            )
        except Exception as exc:
            log.exception("%s failed", verb)
            return reply_cls(
                ok=False, code="internal", error=f"deployer error: {type(exc).__name__}: {exc}"
            )

    # ---- models and deployments -------------------------------------------------------------

    async def list(self, req: ListRequest) -> ListReply:
        models = await self.jetstream.require_store().list_models()
        if req.name is not None:
            models = [m for m in models if m.name == req.name]
        return ListReply(models=models)

    async def _update(
        self, group: str, change: Callable[[Deployment | None], Deployment]
    ) -> Deployment:
        """Compare-and-set the group's record (another deployer may write it too)."""
        store = self.jetstream.require_store()

        async def read() -> tuple[Deployment | None, int]:
            current = await store.deployment(group)
            return current.deployment, current.revision

        return await compare_and_set(read, store.write, change, f"group {group!r}")

    async def activate(self, req: ActivateRequest) -> DeploymentReply:
        ref = ModelVersionRef(name=req.name, version=await self._version(req))
        revision = await self.pipelines.follow_model(req.group, ref, f"deploy {ref.ref}", True)
        now = time.time_ns()

        def change(cur: Deployment | None) -> Deployment:
            dep = decisions.activate(cur, req.group, ref, now)
            return dep.model_copy(update={"pipeline_revision": revision})

        dep = await self._update(req.group, change)
        metrics.ACTIVATIONS.inc()
        self.counts["activations"] += 1
        log.info("group %s: desired model %s", req.group, ref.ref)
        return DeploymentReply(deployment=dep)

    async def _version(self, req: ActivateRequest) -> str:
        """The stored version ``activate`` names, or the latest one uploaded."""
        store = self.jetstream.require_store()
        if req.version is not None:
            if await store.model(req.name, req.version) is None:
                versions = [m.version for m in await store.list_models() if m.name == req.name]
                known = f"stored versions: {', '.join(versions)}" if versions else "none stored"
                raise Refused(
                    "not_found",
                    f"no model {req.name}:{req.version} in the store ({known}); "
                    "upload it first (lensbus models upload PATH)",
                )
            return req.version
        newest = latest(await store.list_models(), req.name)
        if newest is None:
            raise Refused(
                "not_found",
                f"no model named {req.name!r} in the store; upload it first "
                "(lensbus models upload PATH) or see lensbus models list",
            )
        return newest.version

    async def rollback(self, req: RollbackRequest) -> DeploymentReply:
        now = time.time_ns()
        dep = await self._update(req.group, lambda cur: decisions.rollback(cur, req.group, now))
        reason = f"rollback of the model to {dep.model.ref}"
        revision = await self.pipelines.follow_model(req.group, dep.model, reason, False)
        if revision:
            dep = await self._update(
                req.group,
                lambda cur: (cur or dep).model_copy(update={"pipeline_revision": revision}),
            )
        metrics.ROLLBACKS.labels("manual").inc()
        self.counts["rollbacks"] += 1
        log.info("group %s: %s", req.group, dep.reason)
        return DeploymentReply(deployment=dep)

    async def status(self, req: StatusRequest) -> StatusReply:
        store = self.jetstream.require_store()
        deployments, reports = await asyncio.gather(store.deployments(), store.reports())
        settled = time.monotonic() - self._listening_since > 10.0
        groups = decisions.group_statuses(
            deployments, reports, self.heartbeats.values(), time.time_ns(), settled, req.group
        )
        if req.group is not None and not groups:
            groups = [GroupStatus(group=req.group)]
        return StatusReply(groups=groups)
