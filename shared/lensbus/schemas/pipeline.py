"""A camera group's pipeline: the stages every frame of the group goes through.

A person writes it (JSON or YAML: ``lensbus pipeline set --group G FILE``), so it is
configuration: an unknown key is refused, naming it. The deployer keeps the desired pipeline
of each group (KV ``pipeline.<group>``, with history for rollback) beside its model
deployment; a group with only a model deployment runs as before.

Stages, in this order::

    model         the primary model (a detector) on the whole frame        -- inference
    classify ...  secondary models on crops of the primary's detections    -- inference
    track         a ByteTrack-class tracker: a stable track_id per object  -- analytics
    zones         zones and lines per camera: counts, occupancy, dwell     -- analytics

Model stages run where the frame's pixels are (inference: any replica, frame by frame);
tracking and zones run where a camera's results arrive in order (the analytics service:
one owner per camera). Coordinates are normalised to the frame (0..1, x right, y down).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from lensbus.schemas.base import CameraId, ConfigMessage, ConfigPart
from lensbus.subjects import TOKEN_PATTERN, validate_token

StageName = Annotated[
    str, Field(pattern=TOKEN_PATTERN), AfterValidator(lambda v: validate_token(v, "stage name"))
]
ZoneName = Annotated[
    str, Field(pattern=TOKEN_PATTERN), AfterValidator(lambda v: validate_token(v, "zone name"))
]
Point = tuple[Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(ge=0.0, le=1.0)]]


def _model_ref(value: str) -> str:
    name, sep, version = value.partition(":")
    if not sep or not name or not version:
        raise ValueError(f"a model is 'name:version', not {value!r}")
    return value


ModelRefText = Annotated[str, AfterValidator(_model_ref)]
ZoneEvent = Literal["enter", "leave", "loiter"]
ZONE_EVENTS: tuple[ZoneEvent, ...] = ("enter", "leave", "loiter")


class ModelStage(ConfigPart):
    """The primary model, on the whole frame (today's deployed model)."""

    stage: Literal["model"] = "model"
    name: StageName = "model"
    model: ModelRefText = Field(description="a stored model package, 'name:version'")


class ClassifyStage(ConfigPart):
    """A secondary model on crops of the primary model's detections (a cascade); its
    best class attaches to the detection as an attribute."""

    stage: Literal["classify"] = "classify"
    name: StageName = Field(description="names the attribute's source; unique in the pipeline")
    model: ModelRefText = Field(description="a stored classification package, 'name:version'")
    labels: list[str] = Field(
        min_length=1, description="labels of the primary model whose boxes are classified"
    )
    min_size: int = Field(default=16, ge=1, description="boxes smaller (shorter side, px) skip")
    max_crops: int = Field(default=8, ge=1, le=256, description="crops per frame, best first")
    padding: float = Field(default=0.0, ge=0.0, le=1.0, description="box grown by this fraction")
    min_score: float = Field(default=0.0, ge=0.0, le=1.0, description="attach only at this score")


class TrackStage(ConfigPart):
    """ByteTrack-class tracking: Kalman-predicted boxes matched by IoU, high-score
    detections first, then low-score ones to the tracks still unmatched."""

    stage: Literal["track"] = "track"
    name: StageName = "track"
    labels: list[str] = Field(default_factory=list, description="labels tracked; [] = all")
    high_score: float = Field(default=0.5, ge=0.0, le=1.0, description="first-pass detections")
    low_score: float = Field(default=0.1, ge=0.0, le=1.0, description="second pass from here")
    new_track_score: float = Field(default=0.6, ge=0.0, le=1.0, description="a track starts at")
    match_iou: float = Field(default=0.2, gt=0.0, le=1.0, description="least IoU of a match")
    lost_s: float = Field(default=1.5, gt=0.0, le=60.0, description="a lost track is kept so long")

    @model_validator(mode="after")
    def _scores_ordered(self) -> TrackStage:
        if self.low_score > self.high_score:
            raise ValueError("low_score must not exceed high_score")
        return self


class Zone(ConfigPart):
    """A polygon: occupancy, enter/leave, dwell (loitering)."""

    name: ZoneName
    points: list[Point] = Field(min_length=3, description="polygon corners, normalised")
    labels: list[str] = Field(default_factory=list, description="labels counted; [] = all")
    loiter_s: float | None = Field(
        default=None, gt=0.0, description="an object inside this long raises 'loiter'"
    )
    events: list[ZoneEvent] = Field(
        default_factory=lambda: list(ZONE_EVENTS), description="events raised"
    )


class Line(ConfigPart):
    """A line from ``a`` to ``b``: crossings counted per direction. ``in`` is a crossing
    from the left of a->b to its right (as drawn on the image, y down), ``out`` the other."""

    name: ZoneName
    a: Point
    b: Point
    labels: list[str] = Field(default_factory=list, description="labels counted; [] = all")
    events: bool = Field(default=True, description="raise an event per crossing")

    @model_validator(mode="after")
    def _has_length(self) -> Line:
        if self.a == self.b:
            raise ValueError("a line needs two different points")
        return self


class CameraZones(ConfigPart):
    zones: list[Zone] = Field(default_factory=list)
    lines: list[Line] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> CameraZones:
        names = [z.name for z in self.zones] + [ln.name for ln in self.lines]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"zone and line names must be unique per camera: {dup}")
        return self


class ZonesStage(ConfigPart):
    """Zones and lines per camera of the group, on tracked objects."""

    stage: Literal["zones"] = "zones"
    name: StageName = "zones"
    anchor: Literal["bottom_center", "center"] = Field(
        default="bottom_center", description="the point of a box that is in a zone or crosses"
    )
    cameras: dict[CameraId, CameraZones] = Field(min_length=1)


Stage = Annotated[
    ModelStage | ClassifyStage | TrackStage | ZonesStage, Field(discriminator="stage")
]
# Where each kind of stage may stand: model first, then cascades, then tracking, then zones.
ORDER = {"model": 0, "classify": 1, "track": 2, "zones": 3}


class Pipeline(ConfigMessage):
    """The stages of a camera group, in order."""

    kind: ClassVar[str] = "pipeline"

    stages: list[Stage] = Field(min_length=1)
    description: str = ""

    @model_validator(mode="after")
    def _well_formed(self) -> Pipeline:
        kinds = [s.stage for s in self.stages]
        if kinds[0] != "model":
            raise ValueError("stages[0] must be the primary model (stage: model)")
        for kind in ("model", "track", "zones"):
            if kinds.count(kind) > 1:
                raise ValueError(f"at most one '{kind}' stage")
        if [ORDER[k] for k in kinds] != sorted(ORDER[k] for k in kinds):
            raise ValueError("stages must go model, classify..., track, zones")
        if "zones" in kinds and "track" not in kinds:
            raise ValueError("a 'zones' stage counts tracked objects: add a 'track' stage")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique: {dup}")
        return self

    @property
    def primary(self) -> ModelStage:
        first = self.stages[0]
        assert isinstance(first, ModelStage)
        return first

    @property
    def cascades(self) -> list[ClassifyStage]:
        return [s for s in self.stages if isinstance(s, ClassifyStage)]

    @property
    def tracker(self) -> TrackStage | None:
        return next((s for s in self.stages if isinstance(s, TrackStage)), None)

    @property
    def zones(self) -> ZonesStage | None:
        return next((s for s in self.stages if isinstance(s, ZonesStage)), None)

    @property
    def has_analytics(self) -> bool:
        """Whether results go through the analytics service (tracking, zones)."""
        return self.tracker is not None
