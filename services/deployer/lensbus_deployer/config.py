"""Deployer settings: env ``LENSBUS_DEPLOYER_*`` or a YAML/TOML file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from lensbus.modelpkg import DEFAULT_MAX_BYTES
from lensbus.settings import ServiceSettings
from lensbus.subjects import validate_device, validate_token

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

    # ---- a fleet (lensbus.natsleaf): a hub's deployer keeps the fleet; a device's follows it

    fleet_hub: bool = Field(
        default=False,
        description="this deployer is a fleet's hub's: it answers the fleet verbs (fleet add, "
        "deploy --devices, status --fleet) and watches its devices' sources",
    )
    fleet_device: str | None = Field(
        default=None,
        description="this deployer is the device's of that name (its nats-server's JetStream "
        "domain, a leaf node of the hub): it follows the hub's desired models for it, copies "
        "them into the local store, activates them and reports what it serves",
    )
    fleet_hub_domain: str = Field(
        default="hub", description="the hub's JetStream domain (a device's deployer)"
    )
    fleet_seen_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="how often a device reports what it serves while the hub answers",
    )
    fleet_retry_max_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest wait between a device's tries to reach the hub or apply a model",
    )
    fleet_check_s: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="how often a hub's deployer checks its devices' sources (a device that "
        "answers again after a silence gets its sources made anew at once)",
    )
    # The fleet stream's limits mean what JetStream's own do (max_age 0, max_bytes -1: none)
    # and are kept in place: a change applies at the watch's next round.
    fleet_results_max_age_s: float = Field(
        default=30 * 86400.0,
        ge=0,
        description="age limit of the hub's fleet results stream (0: none)",
    )
    fleet_results_max_bytes: int = Field(
        default=8 * 1024 * MiB,
        ge=-1,
        description="size limit of the hub's fleet results stream (-1: none; not 0)",
    )

    @field_validator("fleet_device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return None if value is None else validate_device(value)

    @field_validator("fleet_results_max_bytes")
    @classmethod
    def _fleet_max_bytes(cls, value: int) -> int:
        if value == 0:  # a stream that may hold nothing: surely meant as "no limit"
            raise ValueError("give -1 for no limit, or the limit in bytes; 0 would hold nothing")
        return value

    @field_validator("fleet_hub_domain")
    @classmethod
    def _hub_domain(cls, value: str) -> str:
        return validate_token(value, "JetStream domain")

    @model_validator(mode="after")
    def _limits(self) -> DeployerSettings:
        if self.store_max_bytes != -1 and self.store_max_bytes < self.max_package_bytes:
            raise ValueError(
                f"store_max_bytes ({self.store_max_bytes}) must be -1 or at least "
                f"max_package_bytes ({self.max_package_bytes})"
            )
        if self.fleet_hub and self.fleet_device is not None:
            raise ValueError("fleet_hub and fleet_device: a deployer is a hub's or a device's")
        if self.fleet_device is not None and self.fleet_device == self.fleet_hub_domain:
            raise ValueError(
                f"fleet_device ({self.fleet_device}) must differ from fleet_hub_domain: a "
                "device's JetStream domain is its own"
            )
        return self
