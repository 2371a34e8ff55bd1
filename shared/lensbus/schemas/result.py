"""The result published on ``<prefix>.results.<camera>`` for every processed frame."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lensbus.schemas.base import CameraId, WireMessage, WirePart

Task = Literal["classification", "detection", "segmentation"]


class Box(WirePart):
    """A box in normalized coordinates (0..1 of the frame) and in pixels of the full frame."""

    xmin: float = Field(description="left edge, 0..1 of frame width")
    ymin: float = Field(description="top edge, 0..1 of frame height")
    xmax: float = Field(description="right edge, 0..1 of frame width")
    ymax: float = Field(description="bottom edge, 0..1 of frame height")
    left: int = Field(description="left edge in pixels of the full frame")
    top: int = Field(description="top edge in pixels of the full frame")
    right: int = Field(description="right edge in pixels of the full frame")
    bottom: int = Field(description="bottom edge in pixels of the full frame")

    @classmethod
    def from_normalized(
        cls, xmin: float, ymin: float, xmax: float, ymax: float, width: int, height: int
    ) -> Box:
        def clip(v: float) -> float:
            return min(1.0, max(0.0, float(v)))

        xmin, ymin, xmax, ymax = clip(xmin), clip(ymin), clip(xmax), clip(ymax)
        return cls(
            xmin=xmin,
            ymin=ymin,
            xmax=xmax,
            ymax=ymax,
            left=round(xmin * width),
            top=round(ymin * height),
            right=round(xmax * width),
            bottom=round(ymax * height),
        )


class Attribute(WirePart):
    """A secondary model's answer about one detection (a cascade stage on its crop)."""

    stage: str = Field(description="the pipeline's classify stage that gave it")
    model: str = Field(description="that stage's model, 'name:version'")
    label: str
    class_id: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0)


class Detection(WirePart):
    label: str
    class_id: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0)
    box: Box
    attributes: list[Attribute] = Field(
        default_factory=list, description="answers of the pipeline's classify stages"
    )
    track_id: int | None = Field(
        default=None, ge=1, description="the object's id across frames (a pipeline's track stage)"
    )
    track_label: str = Field(
        default="", description="the label the track held over most of its frames"
    )
    track_since_ns: int | None = Field(
        default=None, ge=0, description="capture time of the track's first frame"
    )


class ClassScore(WirePart):
    label: str
    class_id: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0)


class Segment(WirePart):
    """One class present in a segmentation mask."""

    label: str
    class_id: int = Field(ge=0)
    area: float = Field(ge=0.0, le=1.0, description="fraction of the frame covered")
    box: Box = Field(description="bounding box of the class's pixels")


class ModelRef(WirePart):
    name: str
    version: str
    framework: str = ""
    device: str = ""


class Timings(WirePart):
    """Seconds spent in each stage for this frame."""

    queue: float = Field(default=0.0, ge=0.0, description="arrival to start of work")
    decode: float = Field(default=0.0, ge=0.0, description="JPEG decode")
    preprocess: float = Field(default=0.0, ge=0.0, description="resize, normalize, layout")
    compute: float = Field(default=0.0, ge=0.0, description="the model itself")
    postprocess: float = Field(default=0.0, ge=0.0, description="decoder: outputs to result")


class StageTiming(WirePart):
    """One pipeline stage's part in a result."""

    stage: str = Field(description="the stage's name in the group's pipeline")
    kind: str = Field(description="model, classify, track or zones")
    model: str = Field(default="", description="its model, 'name:version'; '' for none")
    ms: float = Field(ge=0.0, description="milliseconds it took on this frame")
    items: int = Field(default=0, ge=0, description="crops classified, tracks updated, ...")


class Result(WireMessage):
    """The model's output for one frame."""

    kind: ClassVar[str] = "result"

    camera: CameraId
    seq: int = Field(ge=0, description="seq of the frame this result is for")
    capture_ns: int = Field(ge=0, description="capture time of the frame, ns since the epoch")
    result_ns: int = Field(ge=0, description="when the result was published, ns since the epoch")
    width: int = Field(gt=0, description="full frame width, the pixel boxes refer to it")
    height: int = Field(gt=0, description="full frame height")
    model: ModelRef
    task: Task
    instance: str = Field(default="", description="inference instance that produced it")
    detections: list[Detection] = Field(default_factory=list)
    classes: list[ClassScore] = Field(default_factory=list)
    segments: list[Segment] = Field(default_factory=list)
    mask_png: bytes | None = Field(
        default=None, description="segmentation class map as a PNG (one byte per pixel), if asked"
    )
    timings: Timings = Field(default_factory=Timings)
    stages: list[StageTiming] = Field(
        default_factory=list, description="the pipeline's stages that ran on this frame, in order"
    )

    @property
    def latency_s(self) -> float:
        """Seconds from capture to publication of this result."""
        return (self.result_ns - self.capture_ns) / 1e9
