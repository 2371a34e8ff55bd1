"""Inference metrics (served on the service's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from lensbus.metrics import latency_histogram
from lensbus.schemas import ModelRef

FRAMES_RECEIVED = Counter("lensbus_inference_frames_received_total", "Frame messages received")
FRAMES_PROCESSED = Counter(
    "lensbus_inference_frames_processed_total", "Frames run through the model"
)
FRAMES_DROPPED = Counter(
    "lensbus_inference_frames_dropped_total", "Frames not processed", ["reason"]
)
RESULTS_PUBLISHED = Counter("lensbus_inference_results_published_total", "Results published")
STAGE_SECONDS = latency_histogram(
    "lensbus_inference_stage_seconds", "Seconds per frame in each stage", ("stage",)
)
LATENCY_SECONDS = latency_histogram(
    "lensbus_inference_latency_seconds", "Capture to result publication (wall clock)"
)
MODEL_INFO = Gauge(
    "lensbus_inference_model_info",
    "The model in service (1) and the one it replaced (0)",
    ["name", "version", "framework", "device"],
)
BUSY = Gauge("lensbus_inference_busy", "1 while a frame is in the model")
SWAPS = Counter("lensbus_inference_swaps_total", "Live model swaps", ["outcome"])
CACHE_BYTES_REMOVED = Counter(
    "lensbus_inference_cache_bytes_removed_total",
    "Bytes removed from the model cache (stale: left by a dead process or an earlier run, "
    "at start; failed: a package whose unpack, load or warm-up failed)",
    ["kind"],
)
SWAP_SECONDS = latency_histogram(
    "lensbus_inference_swap_seconds", "Seconds per swap stage (fetch, load, warmup)", ("stage",)
)


def set_model_info(new: ModelRef, old: ModelRef | None = None) -> None:
    """Mark ``new`` as the model in service and ``old``, if any, as the one it replaced."""
    if old is not None:
        MODEL_INFO.labels(old.name, old.version, old.framework, old.device).set(0)
    MODEL_INFO.labels(new.name, new.version, new.framework, new.device).set(1)


PIPELINE_STAGE_SECONDS = latency_histogram(
    "lensbus_inference_pipeline_stage_seconds",
    "Seconds per frame in each stage of the group's pipeline (model, classify)",
    ("stage", "kind"),
)
CROPS = Counter(
    "lensbus_inference_crops_total", "Crops a classify stage ran its model on", ["stage"]
)
STAGE_SWAPS = Counter(
    "lensbus_inference_stage_swaps_total",
    "Live swaps of a pipeline's classify stage models",
    ["stage", "outcome"],
)
