"""Message schemas: pydantic models, exported as JSON Schema to ``docs/schemas/``."""

from lensbus.schemas.base import SCHEMA_VERSION, CameraId, Message, Part
from lensbus.schemas.deploy import (
    ActivateRequest,
    Deployment,
    DeploymentReply,
    GroupStatus,
    InstanceState,
    ListReply,
    ListRequest,
    ModelInfo,
    ModelReply,
    ModelVersionRef,
    Reply,
    RollbackRequest,
    StatusReply,
    StatusRequest,
    SwapReport,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    UploadStarted,
)
from lensbus.schemas.event import Event, snapshot_name
from lensbus.schemas.frame import MAX_SIDE, FrameEnvelope
from lensbus.schemas.manifest import DecoderOptions, InputSpec, Manifest, ModelFile
from lensbus.schemas.result import (
    Box,
    ClassScore,
    Detection,
    ModelRef,
    Result,
    Segment,
    Task,
    Timings,
)
from lensbus.schemas.status import State, Status

# Every top-level schema, by the file name its JSON Schema is exported under.
EXPORTED: dict[str, type[Message]] = {
    "frame": FrameEnvelope,
    "result": Result,
    "status": Status,
    "manifest": Manifest,
    "deployment": Deployment,
    "swap_report": SwapReport,
    "event": Event,
}

__all__ = [
    "ActivateRequest",
    "Deployment",
    "DeploymentReply",
    "Event",
    "GroupStatus",
    "InstanceState",
    "ListReply",
    "ListRequest",
    "ModelInfo",
    "ModelReply",
    "ModelVersionRef",
    "Reply",
    "RollbackRequest",
    "StatusReply",
    "StatusRequest",
    "SwapReport",
    "UploadBegin",
    "UploadChunk",
    "UploadCommit",
    "UploadStarted",
    "EXPORTED",
    "MAX_SIDE",
    "SCHEMA_VERSION",
    "Box",
    "CameraId",
    "ClassScore",
    "DecoderOptions",
    "Detection",
    "FrameEnvelope",
    "InputSpec",
    "Manifest",
    "Message",
    "ModelFile",
    "ModelRef",
    "Part",
    "Result",
    "Segment",
    "State",
    "Status",
    "Task",
    "Timings",
    "snapshot_name",
]
