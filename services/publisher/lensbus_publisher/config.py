"""Publisher settings: env ``LENSBUS_PUBLISHER_*`` or a YAML/TOML file.

The publisher serves everything (the page, the streams, the API, ``/metrics`` and
``/healthz``) from one HTTP server on ``host``:``port``. ``metrics_host``/``metrics_port``
of the shared settings follow ``host``/``port``: setting ``metrics_port`` alone moves the
whole server there, setting it to something else than ``port`` is an error.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lensbus.schemas import Event
from lensbus.settings import ServiceSettings
from lensbus.subjects import validate_camera_id, validate_token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


Trigger = Literal["rule", "enter", "leave", "loiter", "cross", "project"]
ZONE_TRIGGERS: frozenset[str] = frozenset({"enter", "leave", "loiter", "cross"})


class Rule(BaseModel):
    """An event rule: fire when a label is seen, at most once per cooldown.

    A rule whose ``triggers`` name zone triggers also selects the analytics service's zone
    and line events (of its ``zones``, ``cameras`` and ``labels``; empty: all): those get a
    clip and the rule's webhook, at most once per cooldown and camera. Trigger ``project``
    likewise selects the events projects raise (``ctx.event``) of its ``projects``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="rule name (A-Z a-z 0-9 _ -), in events and metrics")
    labels: frozenset[str] = Field(
        default=frozenset(),
        description="labels that fire the rule (required with trigger 'rule'); for zone "
        "events, the labels selected (empty: all)",
    )
    triggers: frozenset[Trigger] = Field(
        default=frozenset({"rule"}),
        min_length=1,
        description="'rule': fire on results (as always); enter, leave, loiter, cross: "
        "select the zone events the analytics service raises; project: select the events "
        "projects raise (ctx.event)",
    )
    zones: frozenset[str] = Field(
        default=frozenset(), description="zone events: zones and lines selected; empty: all"
    )
    projects: frozenset[str] = Field(
        default=frozenset(),
        description="project events: the projects selected; empty: all. Given without "
        "triggers, triggers is ['project']",
    )
    min_score: float = Field(default=0.5, ge=0.0, le=1.0, description="detection/class score")
    min_area: float = Field(
        default=0.01, ge=0.0, le=1.0, description="segmentation: fraction of the frame, at least"
    )
    consecutive: int = Field(default=1, ge=1, le=1000, description="matching results in a row")
    cooldown_s: float = Field(
        default=60.0, ge=0.0, description="seconds of frame time between two events of a camera"
    )
    cameras: frozenset[str] = Field(
        default=frozenset(), description="cameras the rule watches; empty: all"
    )
    webhook: HttpUrl | None = Field(default=None, description="POST each event here as JSON")
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key signing each delivery (Lensbus-Signature); never logged; "
        "unset: sent unsigned (a warning at start)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_token(v, "rule name")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: frozenset[str]) -> frozenset[str]:
        for cam in v:
            validate_camera_id(cam)
        return v

    @field_validator("projects")
    @classmethod
    def _projects(cls, v: frozenset[str]) -> frozenset[str]:
        for name in v:
            validate_token(name, "project name")
        return v

    @model_validator(mode="before")
    @classmethod
    def _projects_imply_trigger(cls, data: Any) -> Any:
        # {"projects": ["hotdog-alert"], "webhook": ...} means the events of that project.
        if isinstance(data, dict) and data.get("projects") and "triggers" not in data:
            data = {**data, "triggers": ["project"]}
        return data

    @model_validator(mode="after")
    def _labels_for_results(self) -> Rule:
        if "rule" in self.triggers and not self.labels:
            raise ValueError("labels: at least one is needed when triggers has 'rule'")
        return self

    @property
    def on_results(self) -> bool:
        return "rule" in self.triggers

    def selects(self, event: Event) -> bool:
        """Whether a zone or project event is one this rule selects (cooldown aside)."""
        if event.trigger not in self.triggers:
            return False
        if event.trigger == "project":
            chosen = not self.projects or event.project in self.projects
        else:
            chosen = event.trigger in ZONE_TRIGGERS and (not self.zones or event.zone in self.zones)
        return (
            chosen
            and (not self.cameras or event.camera in self.cameras)
            and (not self.labels or event.label in self.labels)
        )


class PublisherSettings(ServiceSettings):
    service: ClassVar[str] = "publisher"

    host: str = Field(
        default="127.0.0.1",
        description="address of the web server (page, streams, API, /metrics, /healthz)",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="its port; 0 picks a free one")
    token: SecretStr | None = Field(
        default=None,
        description="required when host is not a loopback address; clients send "
        "'Authorization: Bearer <token>' or '?token=<token>'",
    )
    metrics_host: str = Field(default="127.0.0.1", description="follows host")
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="follows port (one server serves everything)"
    )

    # Durable results (JetStream).
    stream_max_age_s: float = Field(
        default=24 * 3600.0, gt=0, description="results and events older than this are dropped"
    )
    stream_max_bytes: int = Field(
        default=1024**3, gt=0, description="size limit of the results stream (oldest go first)"
    )
    snapshots_max_age_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="event snapshots older than this are dropped"
    )
    snapshots_max_bytes: int = Field(
        default=256 * 1024**2, gt=0, description="size limit of the snapshots object store"
    )

    # Streams.
    max_cameras: int = Field(
        default=64,
        gt=0,
        le=4096,
        description="cameras tracked at most; a new one then evicts the longest silent",
    )
    camera_forget_s: float = Field(
        default=300.0,
        ge=1.0,
        le=86400.0,
        description="a camera with no frame or result for this long (and no viewer) is "
        "forgotten, its buffers freed; it comes back with its next frame",
    )
    frame_ring: int = Field(
        default=30, ge=2, le=1000, description="recent frames kept per camera (joins, snapshots)"
    )
    result_ring: int = Field(default=120, ge=2, le=10000, description="recent results kept")
    result_max_age_s: float = Field(
        default=2.0, gt=0, description="a result older than this (vs the frame) is not drawn"
    )
    result_wait_s: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        description="how long the project stream may hold a frame for its own result; "
        "0: never, draw the newest result on the newest frame at once",
    )
    project_jpeg_quality: int = Field(default=80, ge=1, le=100, description="project stream JPEG")
    render_threads: int = Field(default=2, ge=1, le=64, description="threads drawing frames")
    max_viewers: int = Field(default=100, gt=0, description="open streams at most (503 beyond)")
    viewer_stall_s: float = Field(
        default=20.0, gt=0, description="a viewer that takes no data for this long is cut off"
    )
    sse_queue: int = Field(
        default=100, gt=0, le=100000, description="results waiting per SSE client, at most"
    )
    sse_keepalive_s: float = Field(default=15.0, gt=0, description="SSE comment when idle")
    status_forget_s: float = Field(
        default=300.0, gt=0, description="a service silent for this long leaves /api/status"
    )

    # Event rules and webhooks.
    rules: list[Rule] = Field(default_factory=list, description="event rules (JSON list in env)")
    pipeline_group: str = Field(
        default="default",
        description="the group whose pipeline (zones, lines) is drawn for a camera the "
        "cameras bucket gives no group",
    )
    event_queue: int = Field(default=100, gt=0, description="events waiting to be raised")
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=300, description="per attempt")
    webhook_retries: int = Field(
        default=100, ge=0, le=10000, description="retries after a failure; then dropped, counted"
    )
    webhook_backoff_s: float = Field(
        default=0.5, gt=0, le=60, description="first retry delay, doubling, jittered"
    )
    webhook_backoff_max_s: float = Field(
        default=60.0, gt=0, le=3600, description="longest delay between two tries"
    )
    webhook_max_age_s: float = Field(
        default=24 * 3600.0, gt=0, description="a delivery not taken by then is dropped, counted"
    )
    webhook_queue: int = Field(
        default=10000, gt=0, description="deliveries pending per rule (JetStream), at most"
    )

    # Clips around events (only cameras some rule watches are buffered).
    clip_pre_s: float = Field(
        default=5.0, ge=0.0, le=300.0, description="seconds of a clip before the event's frame"
    )
    clip_post_s: float = Field(
        default=5.0, ge=0.0, le=600.0, description="seconds of a clip after the event's frame"
    )
    clip_buffer_bytes: int = Field(
        default=64 * 1024**2,
        gt=0,
        description="pre-event buffer per camera, at most (oldest frames dropped first)",
    )
    clip_max_bytes: int = Field(
        default=128 * 1024**2,
        gt=0,
        le=512 * 1024**2,
        description="one clip at most; a clip reaching it is kept as it is",
    )
    clips_max_age_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="clips older than this are dropped"
    )
    clips_max_bytes: int = Field(
        default=2 * 1024**3, gt=0, description="size limit of the clips store (oldest go first)"
    )

    @field_validator("token")
    @classmethod
    def _token_off_loopback(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        host = info.data.get("host")
        if v is not None and not v.get_secret_value():
            v = None
        if v is None and isinstance(host, str) and not is_loopback(host):
            raise ValueError(
                f"required when host is {host!r} (not a loopback address): set a token, "
                "or bind to 127.0.0.1"
            )
        return v

    @field_validator("pipeline_group")
    @classmethod
    def _group(cls, v: str) -> str:
        return validate_token(v, "pipeline_group")

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, v: list[Rule]) -> list[Rule]:
        names = [r.name for r in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique: {dupes}")
        return v

    @model_validator(mode="after")
    def _clip_fits(self) -> PublisherSettings:
        if self.clip_max_bytes > self.clips_max_bytes:
            raise ValueError(
                f"clip_max_bytes ({self.clip_max_bytes}) is over clips_max_bytes "
                f"({self.clips_max_bytes}): one clip must fit in the store"
            )
        return self

    @model_validator(mode="after")
    def _one_server(self) -> PublisherSettings:
        # One HTTP server serves the page, the API, /metrics and /healthz: the shared
        # metrics_host/metrics_port follow host/port so the Runtime starts that server.
        given = self.model_fields_set
        if "metrics_port" in given and "port" not in given:
            self.port = self.metrics_port
        elif "metrics_port" in given and self.metrics_port != self.port:
            raise ValueError(
                f"metrics_port ({self.metrics_port}) differs from port ({self.port}): the "
                "publisher serves /metrics on port; leave metrics_port unset"
            )
        if "metrics_host" in given and self.metrics_host != self.host:
            raise ValueError(
                f"metrics_host ({self.metrics_host}) differs from host ({self.host}): the "
                "publisher serves /metrics on host; leave metrics_host unset"
            )
        self.metrics_port = self.port
        self.metrics_host = self.host
        return self
