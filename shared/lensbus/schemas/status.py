"""The heartbeat every service publishes on ``<prefix>.status.<service>.<instance>``."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lensbus.schemas.base import WireMessage
from lensbus.schemas.result import ModelRef

State = Literal["starting", "running", "degraded", "failed", "stopping"]


class Status(WireMessage):
    kind: ClassVar[str] = "status"

    service: str
    instance: str
    state: State
    reason: str = Field(default="", description="why the state is not 'running'")
    version: str = Field(description="lensbus version of the service")
    time_ns: int = Field(ge=0, description="when the heartbeat was sent, ns since the epoch")
    interval_s: float = Field(gt=0, description="seconds until the next heartbeat")
    model: ModelRef | None = None
    counters: dict[str, float] = Field(default_factory=dict)
    detail: dict[str, str] = Field(default_factory=dict)
