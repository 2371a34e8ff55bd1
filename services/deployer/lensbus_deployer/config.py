"""Deployer settings: env ``LENSBUS_DEPLOYER_*`` or a YAML/TOML file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from lensbus.modelpkg import DEFAULT_MAX_BYTES
from lensbus.settings import ServiceSettings

MiB = 1024 * 1024


class DeployerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LENSBUS_DEPLOYER_", extra="forbid")
    service: ClassVar[str] = "deployer"

    metrics_port: int = Field(default=9103, ge=0, le=65535, description="0 picks a free port")
    work_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "lensbus-deployer",
        description="where uploads are assembled and checked before they enter the store",
    )
    max_package_bytes: int = Field(
        default=DEFAULT_MAX_BYTES,
        gt=0,
        description="largest package accepted, as uploaded (.tar.gz) and as unpacked",
    )
    store_max_bytes: int = Field(
        default=4 * 1024 * MiB,
        description="limit of the object store lensbus-models when the deployer creates it "
        "(-1: no limit); JetStream refuses uploads beyond it",
    )
    projects_max_bytes: int = Field(
        default=1024 * MiB,
        description="limit of the object store lensbus-projects when the deployer creates it "
        "(-1: no limit)",
    )
    project_import_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=300,
        description="longest a project's handler may take to import in the upload's check",
    )
    store_chunk_bytes: int = Field(
        default=512 * 1024,
        ge=16 * 1024,
        le=8 * MiB,
        description="chunk size of objects in the store (must stay under NATS max_payload)",
    )
    kv_history: int = Field(
        default=20, ge=1, le=64, description="revisions kept per key in lensbus-deployments"
    )
    kv_max_value_bytes: int = Field(default=1 * MiB, gt=0, description="largest KV record")
    kv_max_bytes: int = Field(default=256 * MiB, description="limit of lensbus-deployments")
    upload_idle_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="an upload with no chunk for this long is dropped"
    )
    max_uploads: int = Field(default=4, gt=0, le=64, description="uploads in progress at once")
    orphan_grace_s: float = Field(
        default=120.0,
        gt=0,
        description="chunks of an object put that never completed (a deployer killed mid-put) "
        "are purged once this old",
    )
    jetstream_check_s: float = Field(
        default=2.0, gt=0, le=60, description="how often JetStream's availability is checked"
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="limit of one JetStream call"
    )

    @model_validator(mode="after")
    def _limits(self) -> DeployerSettings:
        if self.store_max_bytes != -1 and self.store_max_bytes < self.max_package_bytes:
            raise ValueError(
                f"store_max_bytes ({self.store_max_bytes}) must be -1 or at least "
                f"max_package_bytes ({self.max_package_bytes})"
            )
        return self
