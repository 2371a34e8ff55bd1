"""Analytics metrics (served on the service's /metrics). Labels stay low-cardinality:
camera, stage, reason. The zones' counts and occupancy are in :mod:`zone_metrics`."""

from prometheus_client import Counter, Gauge

from lensbus.metrics import latency_histogram

RESULTS_IN = Counter(
    "lensbus_analytics_results_received_total", "Results read on detections.<camera>", ["camera"]
)
RESULTS_OUT = Counter(
    "lensbus_analytics_results_published_total", "Results published on results.<camera>", ["camera"]
)
RESULTS_REORDERED = Counter(
    "lensbus_analytics_results_reordered_total",
    "Results that arrived before an earlier seq of their camera and were held back for it",
    ["camera"],
)
RESULTS_LATE = Counter(
    "lensbus_analytics_results_late_total",
    "Results that arrived after their seq was passed (the reorder window gave up on them): "
    "published untracked",
    ["camera"],
)
GAPS = Counter(
    "lensbus_analytics_seq_gaps_total",
    "Missing seqs the reorder window stopped waiting for (frames dropped upstream)",
    ["camera"],
)
RESULTS_IGNORED = Counter(
    "lensbus_analytics_results_ignored_total",
    "Results read while the group's pipeline has no track stage (none are published)",
)
STAGE_SECONDS = latency_histogram(
    "lensbus_analytics_stage_seconds", "Time of a stage on one result", ("camera", "stage")
)
TRACKS_ACTIVE = Gauge(
    "lensbus_analytics_tracks_active", "Tracks matched in the camera's last result", ["camera"]
)
EVENTS = Counter(
    "lensbus_analytics_events_published_total",
    "Zone and line events published on events.<camera>",
    ["camera", "trigger"],
)
PIPELINE_UPDATES = Counter(
    "lensbus_analytics_pipeline_updates_total",
    "Pipelines of the group read (ok), refused (invalid) or deleted (removed)",
    ["outcome"],
)
MQTT_MESSAGES = Counter(
    "lensbus_analytics_mqtt_messages_total",
    "Messages published on the MQTT subjects: event, occupancy, count, config (discovery)",
    ["kind"],
)
MQTT_SKIPPED = Counter(
    "lensbus_analytics_mqtt_skipped_total",
    "Cameras given no MQTT topics (reason: reserved_camera, a camera named like a lensbus "
    "subject token), counted once each",
    ["reason"],
)
