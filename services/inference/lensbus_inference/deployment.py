"""Following a camera group's desired model: watch the KV key, fetch, verify and load in the
background while the old model serves, warm up in the gaps between frames, swap between two
frames, report.

The desired model of group G is the :class:`~lensbus.schemas.Deployment` under
``group.G`` in the KV bucket ``lensbus-deployments``; what this instance did about it goes
to ``report.G.<instance>`` as a :class:`~lensbus.schemas.SwapReport`, which the deployer
watches to roll a failed deployment back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from typing import Any

import nats.errors
from nats.js.errors import NotFoundError

from lensbus.backends import BACKENDS
from lensbus.codec import decode, encode
from lensbus.errors import DecodeError, LensbusError, ModelLoadError, PackageError
from lensbus.keyfollow import KeyFollower
from lensbus.modelpkg import Package, open_package_aside
from lensbus.runtime import Runtime
from lensbus.schemas import Deployment, ModelVersionRef, SwapReport
from lensbus.schemas.deploy import group_key, object_name, report_key
from lensbus_inference import cache, metrics
from lensbus_inference.config import InferenceSettings
from lensbus_inference.model import LoadedModel, load_model

log = logging.getLogger(__name__)

# Blank runs after the check run (LoadedModel.warmup_steps): the first run allocates, the
# check runs twice more, as fast as a frame will.  Each takes a frame's turn: kept few.
WARMUP_RUNS = 0

Timings = tuple[float, float, float]  # fetch, load (unpack + verify + build), warm-up seconds


class SwapFailed(LensbusError):
    """Fetching, verifying, loading or warming up a model failed; the old one stays."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def version_ref(model: LoadedModel | None) -> ModelVersionRef | None:
    if model is None:
        return None
    return ModelVersionRef(name=model.manifest.name, version=model.manifest.version)


class Follower:
    """Keeps this instance on its group's desired model."""

    def __init__(
        self,
        settings: InferenceSettings,
        rt: Runtime,
        current: Callable[[], LoadedModel | None],
        swap: Callable[[LoadedModel], Awaitable[None]],
        turn: Callable[[], AbstractAsyncContextManager[Any]],
        hold: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        assert settings.group is not None
        self.s = settings
        self.group = settings.group
        self.rt = rt
        self._current = current
        self._swap = swap
        self._turn = turn  # held while a frame is in the model
        self._hold = hold  # held while a model is prepared
        self.cache = settings.model_cache
        # A desired model that failed is not retried until the desired model changes.
        self.failed: tuple[str, str] | None = None
        # The pipeline's classify stages as StagesFollower last saw them, in every report.
        self.stages: dict[str, str] = {}
        self._last: tuple[ModelVersionRef, str, str, Timings] | None = None

    async def report(
        self,
        desired: ModelVersionRef,
        state: str,
        reason: str = "",
        timings: Timings = (0.0, 0.0, 0.0),
    ) -> None:
        """Write this instance's SwapReport and mirror it in the heartbeat."""
        self.rt.detail.update(
            {"swap_state": state, "swap_model": desired.ref, "swap_reason": reason}
        )
        self._last = (desired, state, reason, timings)
        fetch_s, load_s, warmup_s = timings
        rep = SwapReport(
            group=self.group,
            instance=self.s.instance,
            desired=desired,
            state=state,
            reason=reason,
            serving=version_ref(self._current()),
            time_ns=time.time_ns(),
            fetch_s=fetch_s,
            load_s=load_s,
            warmup_s=warmup_s,
            stages=dict(self.stages),
        )
        try:
            kv = await self.rt.nc.jetstream().key_value(self.rt.subjects.deployments_bucket)
            await kv.put(report_key(self.group, self.s.instance), encode(rep))
        except Exception as exc:  # the heartbeat still carries the state
            log.warning("swap report for %s not written: %s", desired.ref, exc)

    async def report_stages(self, stages: dict[str, str]) -> None:
        """A classify stage changed: the last report again, with the stages' states.  Only
        a ``serving`` one: a failure written again would read as a new one."""
        self.stages = dict(stages)
        if self._last is not None and self._last[1] == "serving":
            await self.report(*self._last)

    async def fetch(self, ref: ModelVersionRef) -> Path:
        """The package's .tar.gz in the local cache, downloaded if not there yet."""
        dest = self.cache / ref.name / f"{ref.version}.tar.gz"
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.part_path(dest)
        try:
            store = await self.rt.nc.jetstream().object_store(self.rt.subjects.models_bucket)
            # Straight into a file: nats-py assembles an in-memory object by joining bytes,
            # which gets slow for tens of MB.
            with open(tmp, "wb") as out:  # noqa: ASYNC230 - local file, written in chunks
                await store.get(object_name(ref.name, ref.version), writeinto=out)
        except (NotFoundError, nats.errors.Error) as exc:
            tmp.unlink(missing_ok=True)
            raise SwapFailed("fetch", f"{ref.ref} not in the model store ({exc})") from None
        tmp.replace(dest)  # only a complete download is ever seen as cached
        return dest

    async def _unpack(self, archive: Path, work: Path) -> Package:
        """Extract and verify the package into ``work`` in a child process at the lowest
        priority (``open_package_aside``), so it uses the CPU the frames leave idle."""
        try:
            return await open_package_aside(archive, work, self.s.max_package_bytes)
        except PackageError as exc:
            archive.unlink(missing_ok=True)  # noqa: ASYNC240 - a bad download must not stay cached
            raise SwapFailed("load", str(exc)) from None

    def _load(self, package: Package) -> LoadedModel:
        """Build the model (in a normal worker thread: the framework's own threads, started
        here, inherit this thread's priority and serve frames later)."""
        try:
            return load_model(package, self.s.device, self.s.threads, self.s.mask_png)
        except ModelLoadError as exc:
            raise SwapFailed("load", str(exc)) from None

    async def _load_beside(self, package: Package) -> LoadedModel:
        """Load beside the model in service, or in a frame's turn for a backend whose
        loading runs on the threads serving frames (MXNet)."""
        backend = BACKENDS.get(package.manifest.framework)
        if backend is not None and backend.loads_on_serving_threads:
            async with self._turn():
                return await asyncio.to_thread(self._load, package)
        return await asyncio.to_thread(self._load, package)

    async def _warmup(self, model: LoadedModel) -> float:
        """Build and warm ``model`` up one step at a time, each in a frame's turn: a warm-up
        run (or MXNet's build) beside a served frame would halve the cores both get
        (measured: frames then waited long enough to be replaced by newer ones, i.e. lost
        across the swap)."""
        t0 = time.perf_counter()
        try:
            for step in model.warmup_steps(WARMUP_RUNS):
                async with self._turn():
                    await asyncio.to_thread(step)
        except Exception as exc:
            await asyncio.to_thread(model.close)
            raise SwapFailed("warmup", str(exc)) from None
        return time.perf_counter() - t0

    async def prepare(self, desired: ModelVersionRef) -> tuple[LoadedModel, Path, Timings]:
        """Fetch, verify, load and warm up ``desired`` while the models in service serve:
        the one path every model of the group takes (the primary and each classify stage).
        Raises :class:`SwapFailed`; a failed package leaves no folder behind."""
        with self._hold():
            return await self._prepare(desired)

    async def _prepare(self, desired: ModelVersionRef) -> tuple[LoadedModel, Path, Timings]:
        t0 = time.perf_counter()
        work: Path | None = None
        try:
            archive = await self.fetch(desired)
            fetch_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            work = unpacking = await asyncio.to_thread(cache.unpack_dir, archive)
            package = await self._unpack(archive, unpacking)
            model = await self._load_beside(package)
            load_s = time.perf_counter() - t1
            warm_s = await self._warmup(model)
        except SwapFailed:
            if work is not None:
                await asyncio.to_thread(cache.remove, work, "failed")
            raise
        metrics.SWAP_SECONDS.labels("fetch").observe(fetch_s)
        metrics.SWAP_SECONDS.labels("load").observe(load_s)
        metrics.SWAP_SECONDS.labels("warmup").observe(warm_s)
        return model, work, (fetch_s, load_s, warm_s)

    async def apply(self, dep: Deployment) -> None:
        desired = dep.model
        serving = version_ref(self._current())
        if serving == desired:
            self.failed = None
            await self.report(desired, "serving")
            return
        if self.failed == (desired.name, desired.version):
            return
        serving_ref = serving.ref if serving else "nothing"
        log.info("group %s wants %s (serving %s): loading", self.group, desired.ref, serving_ref)
        await self.report(desired, "loading")
        try:
            model, work, timings = await self.prepare(desired)
        except SwapFailed as exc:
            self.failed = (desired.name, desired.version)
            metrics.SWAPS.labels("failed").inc()
            keeping = serving.ref if serving else "no model"
            log.error("swap to %s failed, keeping %s: %s", desired.ref, keeping, exc)
            # Kept in the heartbeat after the deployer rolls back, until a swap succeeds.
            self.rt.detail["last_failure"] = f"{desired.ref}: {exc}"
            await self.report(desired, "failed", str(exc))
            return
        await self._swap(model)
        await asyncio.to_thread(cache.keep, work)
        self.failed = None
        metrics.SWAPS.labels("ok").inc()
        log.info("now serving %s (fetch %.2fs, load %.2fs, warm-up %.2fs)", desired.ref, *timings)
        await self.report(desired, "serving", timings=timings)

    async def _read(self, data: bytes | None) -> None:
        if data is None:  # a deleted deployment: the model in service stays
            return
        try:
            dep = decode(data, Deployment)
        except DecodeError as exc:
            log.warning("unreadable deployment for group %s: %s", self.group, exc)
            return
        await self.apply(dep)

    async def run(self) -> None:
        """Follow the group's key until stopped; survives NATS and deployer restarts."""
        await asyncio.to_thread(cache.clean, self.cache)
        await KeyFollower(self.rt, group_key(self.group), self._read).run()
