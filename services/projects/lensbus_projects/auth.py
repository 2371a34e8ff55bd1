"""The projects' NATS users, answered by this service through NATS auth callout.

Each project's host connects as ``project-<name>`` with the password
``natsprojects.project_password(seed, name)``; nats-server asks this service (the callout
issuer) who that is, and it answers with ``natsprojects.project_permissions(name, prefix)``
for a project it runs: read every camera's frames and results, publish only
``<p>.projects.<name>.>`` and events, use only its own state bucket. Anything else is refused.
Every decision is counted by outcome (allowed, refused, invalid, error:
:class:`lensbus.natscallout.CalloutService`).

Without a seed (a server without auth, as in development) there is no callout and hosts
connect without credentials.
"""

from __future__ import annotations

import logging

from lensbus import natsprojects
from lensbus.natscallout import CalloutService
from lensbus.runtime import Runtime
from lensbus_projects import metrics
from lensbus_projects.config import ProjectsSettings

log = logging.getLogger(__name__)


class Auth:
    def __init__(self, s: ProjectsSettings) -> None:
        self.s = s
        self.seed = s.seed
        self.service: CalloutService | None = None

    @property
    def enabled(self) -> bool:
        return self.seed is not None

    def password(self, project: str) -> str:
        if self.seed is None:
            return ""
        return natsprojects.project_password(self.seed, project)

    async def start(self, rt: Runtime) -> None:
        """Answer the callout for every ``project-<name>`` user whose password checks out: the
        password (an HMAC of the name only the seed's holders can make) is the proof, and
        `lensbus project run` connects as a project that is not deployed yet."""
        if self.seed is None:
            return
        authorize = natsprojects.project_authorizer(self.seed, self.s.prefix)
        self.service = CalloutService(
            rt.nc,
            self.seed,
            authorize,
            on_decision=lambda kind, reason: metrics.AUTH.labels(kind).inc(),
        )
        await self.service.start()
        log.info("answering NATS auth callout for the projects' users")

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
