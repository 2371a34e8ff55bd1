"""Projects-service settings: env ``LENSBUS_PROJECTS_*`` or a YAML/TOML file."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, model_validator

from lensbus.settings import ServiceSettings


class ProjectsSettings(ServiceSettings):
    service: ClassVar[str] = "projects"

    metrics_port: int = Field(default=9105, ge=0, le=65535, description="0 picks a free port")
    callout_seed: SecretStr | None = Field(
        default=None,
        description="nkey seed (SA...) of the auth-callout issuer: this service answers NATS's "
        "auth callout for the projects' users, and their passwords derive from it; unset: no "
        "callout, hosts connect without credentials (a server without auth)",
    )
    callout_seed_file: Path | None = Field(
        default=None, description="a file holding callout_seed (a mounted secret)"
    )
    cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "lensbus-projects",
        description="where project versions and their models are unpacked, and hosts' logs",
    )
    python: str = Field(
        default=sys.executable, description="the interpreter that runs the projects' hosts"
    )
    restart_backoff_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="first delay before a dead host is started again "
        "(doubles on each restart, up to 30 s; back to this after 60 s up)",
    )
    stop_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="how long a stopping host may take to answer 'stopped' before it is killed",
    )
    report_s: float = Field(
        default=2.0, gt=0, le=60, description="how often each project's report is written"
    )

    @model_validator(mode="after")
    def _seed_file(self) -> ProjectsSettings:
        if self.callout_seed is None and self.callout_seed_file is not None:
            try:
                seed = self.callout_seed_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"callout_seed_file: cannot read it ({exc})") from None
            self.callout_seed = SecretStr(seed)
        return self

    @property
    def seed(self) -> str | None:
        return None if self.callout_seed is None else self.callout_seed.get_secret_value()
