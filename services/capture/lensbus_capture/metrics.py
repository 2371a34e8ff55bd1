"""Capture metrics (served on the service's /metrics), per camera (label ``camera``)."""

from prometheus_client import Counter, Gauge

from lensbus.metrics import latency_histogram

FRAMES_CAPTURED = Counter(
    "lensbus_capture_frames_captured_total",
    "Frames read from the source (a live source: every frame it sent, most of them skipped "
    "when it is faster than the fps cap)",
    ["camera"],
)
FRAMES_PUBLISHED = Counter(
    "lensbus_capture_frames_published_total",
    "Frames published on the device stream (with a model stream and device_stream on_demand: "
    "while someone wants them, else idle_fps)",
    ["camera"],
)
MODEL_FRAMES_PUBLISHED = Counter(
    "lensbus_capture_model_frames_published_total",
    "Frames published on the model stream (model_height set)",
    ["camera"],
)
FRAMES_DROPPED = Counter(
    "lensbus_capture_frames_dropped_total",
    "Frames taken for publishing but not published",
    ["camera", "reason"],
)
ENCODE_SECONDS = latency_histogram(
    "lensbus_capture_encode_seconds", "JPEG encode time per frame", ("camera",)
)
READ_SECONDS = latency_histogram(
    "lensbus_capture_read_seconds",
    "Time to read a frame (a file) or decode the one published (a live source)",
    ("camera",),
)
SOURCE_REOPENS = Counter(
    "lensbus_capture_source_reopens_total", "Times the source was reopened", ["camera"]
)
SOURCE_UP = Gauge("lensbus_capture_source_up", "1 while the source delivers frames", ["camera"])
DEVICE_FRAMES_SKIPPED = Counter(
    "lensbus_capture_device_frames_skipped_total",
    "Device-stream frames not encoded: a model stream serves inference and nobody said they "
    "want the device stream (lensbus.demand)",
    ["camera"],
)
DEVICE_STREAM_WANTED = Gauge(
    "lensbus_capture_device_stream_wanted",
    "1 while every device-stream frame is encoded (wanted, always, or no model stream)",
    ["camera"],
)
