"""Starting a project version's host and handing results over to it.

:func:`start_host` spawns the host and waits for its ``ready`` (a start that fails says why,
with the last lines of its log); :func:`take_over` stops the version that served (its
``stopped`` says the last seq it handled per camera) and lets the new one ``go`` after it,
so each result is handled by exactly one of them (lensbus.projects.control).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lensbus.natsprojects import project_user
from lensbus.projects import control
from lensbus.schemas.project import ProjectManifest
from lensbus_projects import metrics
from lensbus_projects.config import ProjectsSettings
from lensbus_projects.hostproc import HostProcess

# How long a stopping host may finish its call in hand, past its deadline_s, before it is
# killed (and the handover uses its last beat).
STOP_GRACE_S = 2.0
# Each thread of a native pool reserves memory that the data limit counts: a project's
# numpy keeps to one thread unless the environment says otherwise.
THREAD_DEFAULTS = {"OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


class StartFailed(Exception):
    """A version whose host did not become ready: the cause in one line."""


def cameras_text(cameras: list[str] | str) -> str:
    return cameras if isinstance(cameras, str) else ",".join(cameras)


def host_env(
    s: ProjectsSettings,
    folder: Path,
    manifest: ProjectManifest,
    cameras: list[str] | str,
    password: str,
    models: Path,
) -> dict[str, str]:
    """The host's environment: none of the service's own ``LENSBUS_*`` variables (its seed
    stays here), the project's per control.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENSBUS_")}
    for key, value in THREAD_DEFAULTS.items():
        env.setdefault(key, value)
    env.update(
        {
            control.ENV_DIR: str(folder),
            control.ENV_NATS_URL: s.nats_url,
            control.ENV_USER: project_user(manifest.name) if password else "",
            control.ENV_PASSWORD: password,
            control.ENV_PREFIX: s.prefix,
            control.ENV_CAMERAS: cameras_text(cameras),
            control.ENV_INSTANCE: s.instance,
            control.ENV_MODELS: str(models),
            control.ENV_TLS_CA: str(s.nats_tls_ca or ""),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


async def start_host(
    s: ProjectsSettings, manifest: ProjectManifest, folder: Path, env: dict[str, str]
) -> HostProcess:
    """A host of ``manifest``'s version that answered ``ready``; raises :class:`StartFailed`."""
    name, version = manifest.name, manifest.version
    log_path = folder.parent / f"{version}.log"
    host = HostProcess(name, version, log_path)
    t0 = time.monotonic()
    try:
        await host.start(s.python, env, manifest.limits.memory_mb, folder)
    except OSError as exc:
        metrics.STARTS.labels(name, "failed").inc()
        raise StartFailed(f"cannot start {s.python}: {exc}") from None
    message = await host.expect(("ready", "failed"), manifest.limits.start_s)
    if message is not None and message["t"] == "ready":
        host.ready = True
        metrics.START_SECONDS.labels(name).observe(time.monotonic() - t0)
        metrics.STARTS.labels(name, "ready").inc()
        return host
    if message is not None:
        reason = str(message.get("reason") or "failed")
    else:
        code = host.returncode if host.returncode is not None else await host.wait(2.0)
        if code is None:
            reason = f"no ready within {manifest.limits.start_s:g} s"
        else:
            reason = f"its process exited with code {code} before ready"
    await host.close()
    tail = host.log_tail(3)
    metrics.STARTS.labels(name, "failed").inc()
    raise StartFailed(f"{reason} (log: {tail})" if tail and tail not in reason else reason)


async def stop_host(host: HostProcess, deadline_s: float) -> control.Last | None:
    """Stop ``host`` (it finishes its call in hand): the last seq it handled per camera, or
    None when it never answered (it is killed; its last beat is what is known)."""
    last: control.Last | None = None
    if await host.send({"t": "stop"}):
        message = await host.expect(("stopped",), deadline_s + STOP_GRACE_S)
        if message is not None:
            last = {str(k): int(v) for k, v in (message.get("last") or {}).items()}
    if await host.wait(STOP_GRACE_S if last is not None else 0.01) is None:
        host.kill()
        await host.wait(5.0)
    await host.close()
    return last


async def take_over(
    project: str, new: HostProcess, old: HostProcess | None, deadline_s: float
) -> control.Last | None:
    """Hand results over from ``old`` (None, or dead) to ``new`` and return the 'after' sent.

    A live old host is stopped and its "stopped" ``last`` (what it handled last per camera;
    its last beat's if it had to be killed) is the new one's 'after': the new host holds only
    results that came since it subscribed, and skips those the old one handled. After a crash
    (or on a first start) 'after' is None: everything the new host holds came after the old
    one died. Nothing older is carried over: a capture restarted meanwhile numbers its frames
    from 0 again, and a kept maximum would skip them."""
    t0 = time.monotonic()
    after: control.Last | None = None
    alive = old is not None and old.returncode is None and not old.killed
    if old is not None and alive:
        last = await stop_host(old, deadline_s)
        after = last if last is not None else dict(old.beat.last)
    elif old is not None:
        await old.close()
    await new.send({"t": "go", "after": after})
    if alive:  # a handover from a running version (not a restart after a crash)
        metrics.SWAP_GAP_SECONDS.labels(project).observe(time.monotonic() - t0)
        metrics.STARTS.labels(project, "swapped").inc()
    return after
