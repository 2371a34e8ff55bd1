"""Projects-service lifecycle: settings -> Runtime -> the auth callout for the projects'
NATS users -> follow the ``project.*`` records and the cameras' groups, run each project in
a supervised host process -> wait for stop -> stop every project (on_stop runs).

One projects service per box runs every deployed project; each project runs in a process of
its own (``python -m lensbus.projects.host``) so nothing a project does can reach this
service, inference or capture: a crash, a hang or a runaway allocation costs only that
process, which is restarted.
"""

from __future__ import annotations

import asyncio
import logging

from lensbus.runtime import Runtime
from lensbus.secrecy import hide_environment
from lensbus_projects.auth import Auth
from lensbus_projects.config import ProjectsSettings
from lensbus_projects.follow import ProjectsFollower
from lensbus_projects.projects import Projects

log = logging.getLogger(__name__)


async def run(settings: ProjectsSettings) -> int:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    hide_environment()  # users' code runs in children of ours, as our OS user
    auth = Auth(settings)
    projects: Projects | None = None

    def counters() -> dict[str, float]:
        return projects.counters() if projects is not None else {}

    async with Runtime(settings, counters=counters) as rt:
        if rt.bus.nc is None:  # stopped before NATS was reachable
            return 0
        projects = Projects(rt, settings, auth.password)
        await auth.start(rt)
        follower = ProjectsFollower(rt, projects.on_record)
        tasks = [
            asyncio.create_task(follower.run(), name="follow"),
            asyncio.create_task(projects.groups.run(), name="cameras"),
        ]
        rt.detail["callout"] = "on" if auth.enabled else "off"
        rt.set_state("running")
        log.info("projects service up (cache %s)", settings.cache_dir)
        await rt.stop.wait()
        await projects.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await auth.stop()
    return 0
