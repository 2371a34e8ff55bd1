"""What the projects service follows: the ``project.*`` keys of the deployments bucket (the
desired release of each project; a deleted key stops that project) and the cameras bucket's
groups (which cameras each project serves).

A watcher's consumer does not survive a NATS restart, so every key is also re-read each
:data:`RECHECK_S` (as :class:`lensbus.keyfollow.KeyFollower` does for one key).

Which cameras a project serves: ``cameras`` of its project.json when given; otherwise
every camera (``*``) when its groups include ``default`` (a camera with no record in the
cameras bucket, e.g. capture's own ``--camera``, belongs to no other group, and a camera whose
record has no ``group`` is in ``default``); otherwise the cameras of the cameras bucket whose
``group`` is one of its groups, sent to its host again when that set changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from lensbus.codec import DecodeError, decode
from lensbus.runtime import Runtime
from lensbus.schemas.camera import CAMERA_PREFIX, CameraConfig
from lensbus.schemas.project import ProjectDeployment, ProjectManifest, project_key
from lensbus.waiting import sleep_unless_stopped
from lensbus_projects import metrics

log = logging.getLogger(__name__)

RECHECK_S = 1.0
DEFAULT_GROUP = "default"
KEY_PREFIX = project_key("")  # "project."

OnRecord = Callable[[str, ProjectDeployment | None], Awaitable[None]]


async def keys_with(kv: KeyValue, prefix: str) -> list[str]:
    """The bucket's keys starting with ``prefix`` (nats-py's ``keys(filters=...)`` matches
    substrings, not subject wildcards, and raises when there are none)."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    return [k for k in keys if k.startswith(prefix)]


class ProjectsFollower:
    """Calls ``on_record(name, record)`` for each new revision of a ``project.<name>`` key,
    ``on_record(name, None)`` once when it is deleted."""

    def __init__(self, rt: Runtime, on_record: OnRecord) -> None:
        self.rt = rt
        self.on_record = on_record
        self.revisions: dict[str, int] = {}  # name -> revision delivered
        self._bad: set[tuple[str, int]] = set()

    async def _deliver(self, key: str, value: bytes | None, revision: int) -> None:
        name = key[len(KEY_PREFIX) :]
        if value is None:
            if self.revisions.pop(name, None) is not None:
                await self.on_record(name, None)
            return
        if self.revisions.get(name) == revision:
            return
        self.revisions[name] = revision
        try:
            record = decode(value, ProjectDeployment)
        except (DecodeError, ValidationError, ValueError) as exc:
            metrics.RECORDS_REJECTED.labels("invalid_record").inc()
            if (name, revision) not in self._bad:
                self._bad.add((name, revision))
                log.warning("deployment record %s (revision %d) refused: %s", key, revision, exc)
            return
        if record.name != name or record.state == "removed":
            await self.on_record(name, None)
            return
        await self.on_record(name, record)

    async def run(self) -> None:
        waiting_logged = False
        while not self.rt.stop.is_set():
            try:
                kv = await self.rt.nc.jetstream().key_value(self.rt.subjects.deployments_bucket)
                watcher = await kv.watch(f"{KEY_PREFIX}*")
            except (BucketNotFoundError, NotFoundError, nats.errors.Error, OSError) as exc:
                if not waiting_logged:
                    log.info("waiting for the deployments bucket (%s)", exc)
                    waiting_logged = True
                await sleep_unless_stopped(self.rt.stop, RECHECK_S)
                continue
            try:
                await self._follow(kv, watcher)
            except (nats.errors.Error, OSError) as exc:
                log.debug("watch of the projects interrupted: %s", exc)
                await sleep_unless_stopped(self.rt.stop, RECHECK_S)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def _follow(self, kv: KeyValue, watcher: KeyValue.KeyWatcher) -> None:
        while not self.rt.stop.is_set():
            try:
                entry = await watcher.updates(timeout=RECHECK_S)
            except nats.errors.TimeoutError:
                if await self._recheck(kv):
                    return  # the watch missed something: start a new one
                continue
            if entry is None:
                continue
            if entry.operation is not None or not entry.value:  # DEL or PURGE
                await self._deliver(entry.key, None, 0)
            else:
                await self._deliver(entry.key, entry.value, entry.revision or 0)

    async def _recheck(self, kv: KeyValue) -> bool:
        """Read every project key again; True when something was missed."""
        keys = await keys_with(kv, KEY_PREFIX)
        missed = False
        present = set()
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            name = key[len(KEY_PREFIX) :]
            present.add(name)
            if entry.value and self.revisions.get(name) != entry.revision:
                missed = True
                await self._deliver(key, entry.value, entry.revision or 0)
        for name in set(self.revisions) - present:
            try:  # a deletion is believed only from the key itself
                await kv.get(project_key(name))
            except KeyNotFoundError:
                missed = True
                await self._deliver(project_key(name), None, 0)
        return missed


class CameraGroups:
    """The cameras bucket's camera records' groups, re-read every :data:`RECHECK_S`."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.groups: dict[str, str] = {}  # camera -> group

    def cameras(self, manifest: ProjectManifest, groups: list[str]) -> list[str] | str:
        """project.json's cameras, else those of ``groups`` (the deploy's, which may differ
        from project.json's): every camera for ``default``, else the cameras bucket's."""
        if manifest.cameras:
            return list(manifest.cameras)
        if DEFAULT_GROUP in groups:
            return "*"
        wanted = set(groups)
        return sorted(cam for cam, group in self.groups.items() if group in wanted)

    async def run(self) -> None:
        while not self.rt.stop.is_set():
            with contextlib.suppress(nats.errors.Error, NotFoundError, OSError):
                await self._read()
            await sleep_unless_stopped(self.rt.stop, RECHECK_S)

    async def _read(self) -> None:
        kv = await self.rt.nc.jetstream().key_value(self.rt.subjects.cameras_bucket)
        keys = await keys_with(kv, CAMERA_PREFIX)
        groups: dict[str, str] = {}
        for key in keys:
            try:
                entry = await kv.get(key)
                config = decode(entry.value or b"", CameraConfig)
            except (KeyNotFoundError, DecodeError, ValidationError, ValueError):
                continue
            groups[key[len(CAMERA_PREFIX) :]] = config.group or DEFAULT_GROUP
        self.groups = groups
