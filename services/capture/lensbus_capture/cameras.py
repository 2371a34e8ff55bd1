"""The cameras one capture process runs: one :class:`Capture` (a task, and a reader thread
for a live source) per camera, all on the process's one NATS connection.

:meth:`Cameras.apply` makes the running set equal a desired one (from the settings, or the
``lensbus-cameras`` bucket through ``desired.py``) without disturbing the cameras whose
config did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from lensbus.runtime import Runtime
from lensbus.schemas.camera import CameraConfig, CameraState
from lensbus_capture import metrics
from lensbus_capture.capture import Capture
from lensbus_capture.config import CaptureSettings
from lensbus_capture.sources import Source

log = logging.getLogger(__name__)

# How long a removed camera may take to stop before apply() goes on without it (a source
# still opening cannot be interrupted: its task ends when the open returns).
STOP_WAIT_S = 5.0


class Cameras:
    """The running cameras of this process, keyed by camera id.

    ``on_state`` is called with every state a camera enters (opening, running, retrying,
    ended, stopped); it is a plain attribute, so whoever follows the desired state may set
    it after construction."""

    def __init__(
        self,
        rt: Runtime,
        settings: CaptureSettings,
        on_state: Callable[[CameraState], None],
    ) -> None:
        self.rt = rt
        self.settings = settings
        self.on_state = on_state
        self._running: dict[str, tuple[CameraConfig, Capture, asyncio.Task[int]]] = {}
        self._states: dict[str, CameraState] = {}
        self._next_seq: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def apply(
        self,
        configs: Mapping[str, CameraConfig],
        sources: Mapping[str, Source] | None = None,
    ) -> None:
        """Make the running set equal `configs`: start new ones, restart changed ones, stop
        removed ones; cameras whose config did not change are not disturbed (no lost frame).

        ``sources``: already open sources for some of the new cameras (used, not reopened)."""
        async with self._lock:
            going = [cam for cam, run in self._running.items() if configs.get(cam) != run[0]]
            await asyncio.gather(*(self._stop_one(cam) for cam in going))
            for cam, config in configs.items():
                if cam not in self._running:
                    self._start(config, (sources or {}).get(cam))
            self._describe()

    def states(self) -> dict[str, CameraState]:
        return dict(self._states)

    def task(self, camera: str) -> asyncio.Task[int]:
        """The task running ``camera``: its result is 0 at the end of a file, 1 if a file
        failed, 0 when stopped."""
        return self._running[camera][2]

    def counters(self) -> dict[str, float]:
        total = {"captured": 0.0, "published": 0.0, "dropped": 0.0, "skipped": 0.0}
        for _, capture, _ in self._running.values():
            for k, v in capture.counters().items():
                total[k] += v
        total["cameras"] = float(len(self._running))
        return total

    async def stop(self) -> None:
        async with self._lock:
            await asyncio.gather(*(self._stop_one(cam) for cam in list(self._running)))
            self._describe()

    def _start(self, config: CameraConfig, source: Source | None) -> None:
        cam = config.id
        capture = Capture(
            config,
            self.rt,
            self.settings.reopen_max_s,
            lambda state: None,
            seq=self._next_seq.get(cam, 0),
            source=source,
        )
        # Its states name it: a late one from a camera already replaced is ignored.
        capture.on_state = lambda state: self._report(capture, state)
        task = asyncio.create_task(capture.run(), name=f"camera {cam}")
        self._running[cam] = (config, capture, task)
        log.info("camera %s: capturing %s at up to %.1f fps", cam, config.source, config.fps)

    async def _stop_one(self, cam: str) -> None:
        config, capture, task = self._running.pop(cam)
        capture.request_stop()
        done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
        if not done:
            log.warning("camera %s: still stopping after %.0f s; going on", cam, STOP_WAIT_S)
        elif not task.cancelled() and task.exception() is not None:
            log.error("camera %s failed: %r", cam, task.exception())
        # A restarted camera continues its sequence: subscribers see seq strictly increase.
        self._next_seq[cam] = capture.seq
        self._states.pop(cam, None)
        with contextlib.suppress(KeyError):
            metrics.SOURCE_UP.remove(cam)
        self._health()
        log.info("camera %s: stopped (%s)", cam, config.source)

    def _report(self, capture: Capture, state: CameraState) -> None:
        running = self._running.get(state.camera)
        if running is not None and running[1] is capture:
            self._states[state.camera] = state
            self._health()
        elif running is not None or state.state != "stopped":
            return  # a late word from a camera already replaced by its new config
        try:
            self.on_state(state)
        except Exception:  # a broken listener must not stop a camera
            log.exception("camera state listener failed")

    def _health(self) -> None:
        """The service is degraded (heartbeat, /healthz 503) only while every camera it runs
        is retrying: one bad URL among working cameras must not make a healthcheck restart
        capture (which cannot fix it) or keep `lensbus up` from starting. The retrying ones
        are named in the heartbeat's detail either way, and in their states and metrics."""
        retrying = [s for s in self._states.values() if s.state == "retrying"]
        reason = "; ".join(f"camera {s.camera}: {s.reason}" for s in retrying)
        if retrying:
            self.rt.detail["retrying"] = reason
        else:
            self.rt.detail.pop("retrying", None)
        if retrying and len(retrying) == len(self._states):
            self.rt.set_state("degraded", reason)
        else:
            self.rt.set_state("running")

    def _describe(self) -> None:
        cams = sorted(self._running)
        retrying = self.rt.detail.get("retrying")
        self.rt.detail = {"cameras": ",".join(cams)}
        if retrying:
            self.rt.detail["retrying"] = retrying
        if len(cams) == 1:
            config = self._running[cams[0]][0]
            self.rt.detail.update(camera=config.id, source=config.source)
