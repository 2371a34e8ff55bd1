"""Capture metrics (served on the service's /metrics)."""

from prometheus_client import Counter, Gauge

from lensbus.metrics import latency_histogram

FRAMES_CAPTURED = Counter("lensbus_capture_frames_captured_total", "Frames read from the source")
FRAMES_PUBLISHED = Counter("lensbus_capture_frames_published_total", "Frames published on NATS")
FRAMES_DROPPED = Counter(
    "lensbus_capture_frames_dropped_total", "Frames captured but not published", ["reason"]
)
ENCODE_SECONDS = latency_histogram("lensbus_capture_encode_seconds", "JPEG encode time per frame")
READ_SECONDS = latency_histogram("lensbus_capture_read_seconds", "Source read time per frame")
SOURCE_REOPENS = Counter("lensbus_capture_source_reopens_total", "Times the source was reopened")
SOURCE_UP = Gauge("lensbus_capture_source_up", "1 while the source delivers frames")
