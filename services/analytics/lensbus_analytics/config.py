"""Analytics settings: env ``LENSBUS_ANALYTICS_*`` or a YAML/TOML file."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from lensbus.settings import ServiceSettings
from lensbus.subjects import validate_camera_id, validate_token


class AnalyticsSettings(ServiceSettings):
    service: ClassVar[str] = "analytics"

    group: str = Field(
        default="default",
        description="camera group whose pipeline (KV pipeline.<group>) this instance applies",
    )
    cameras: str = Field(
        default="*",
        description="'*' for every camera's detections, or a comma list: the group's cameras "
        "when several groups track (one analytics instance owns each camera)",
    )
    reorder_frames: int = Field(
        default=8,
        ge=1,
        le=256,
        description="results held per camera while an earlier seq is missing; past this the "
        "gap is given up",
    )
    reorder_wait_s: float = Field(
        default=0.25,
        ge=0.0,
        le=10.0,
        description="longest a result waits for an earlier seq before the gap is given up",
    )
    max_cameras: int = Field(
        default=256, ge=1, description="cameras tracked at once; results of more are rejected"
    )
    mqtt: bool = Field(
        default=True,
        description="publish events, zone occupancy and line counts as JSON on the MQTT "
        "subjects, with Home Assistant discovery configs (lensbus.natsmqtt)",
    )
    results_acked: bool = Field(
        default=False,
        description="publish results as JetStream publishes and retry each until the results "
        "stream stores it (a cluster: none lost while a node fails; lensbus.stored)",
    )
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="0 picks a free port")

    @field_validator("group")
    @classmethod
    def _group_token(cls, v: str) -> str:
        return validate_token(v, "group")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: str) -> str:
        if v.strip() != "*":
            for cam in v.split(","):
                validate_camera_id(cam.strip())
        return v.strip()

    @property
    def camera_list(self) -> list[str] | None:
        """The cameras to follow, or ``None`` for all."""
        if self.cameras == "*":
            return None
        return [c.strip() for c in self.cameras.split(",")]
