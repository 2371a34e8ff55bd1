"""Publisher metrics (served on the publisher's own port, beside the page)."""

from prometheus_client import Counter, Gauge, Histogram

from lensbus.metrics import latency_histogram

STREAMS = ("device", "project", "results")

VIEWERS = Gauge(
    "lensbus_publisher_viewers", "Open streams by camera and stream", ["camera", "stream"]
)
CAMERAS_FORGOTTEN = Counter(
    "lensbus_publisher_cameras_forgotten_total",
    "Cameras dropped from the table (silent: nothing for camera_forget_s; evicted: the "
    "longest silent, to make room for a new one in a full table)",
    ["reason"],
)
FRAMES_SERVED = Counter(
    "lensbus_publisher_frames_served_total",
    "Frames (or results) written to viewers",
    ["camera", "stream"],
)
FRAMES_RECEIVED = Counter(
    "lensbus_publisher_frames_received_total", "Frames received from capture", ["camera"]
)
RESULTS_RECEIVED = Counter(
    "lensbus_publisher_results_received_total", "Results received from inference", ["camera"]
)
FRAMES_RENDERED = Counter(
    "lensbus_publisher_frames_rendered_total", "Project frames drawn (once per frame)", ["camera"]
)
RENDER_SECONDS = latency_histogram(
    "lensbus_publisher_render_seconds", "Decode, draw and encode of one project frame"
)
RENDER_ERRORS = Counter(
    "lensbus_publisher_render_errors_total", "Frames that could not be drawn", ["camera"]
)
VIEWER_DROPS = Counter(
    "lensbus_publisher_viewer_drops_total",
    "Viewers cut off or items skipped for a slow viewer",
    ["stream", "reason"],
)
EVENTS_RAISED = Counter("lensbus_publisher_events_raised_total", "Events raised", ["rule"])
EVENTS_DROPPED = Counter("lensbus_publisher_events_dropped_total", "Events not raised", ["reason"])
SNAPSHOTS = Counter(
    "lensbus_publisher_snapshots_total", "Event snapshots stored, by outcome", ["outcome"]
)
WEBHOOK_DELIVERIES = Counter(
    "lensbus_publisher_webhook_deliveries_total",
    "Webhook deliveries by outcome (delivered: a 2xx; dropped: see webhook_dropped_total)",
    ["outcome"],
)
WEBHOOK_DROPPED = Counter(
    "lensbus_publisher_webhook_dropped_total",
    "Webhook deliveries given up, by reason (max_deliveries, expired, rejected: a 4xx, "
    "queue_full, not_stored: JetStream away)",
    ["reason"],
)
WEBHOOK_RETRIES = Counter(
    "lensbus_publisher_webhook_retries", "Webhook deliveries put back for another try"
)
WEBHOOK_PENDING = Gauge(
    "lensbus_publisher_webhook_pending",
    "Webhook deliveries of a rule in JetStream, not yet taken by the receiver",
    ["rule"],
)
WEBHOOK_ATTEMPTS = Counter(
    "lensbus_publisher_webhook_attempts_total",
    "Webhook POST attempts by result (ok, http_<code>, timeout, error)",
    ["result"],
)
WEBHOOK_SECONDS: Histogram = latency_histogram(
    "lensbus_publisher_webhook_seconds", "Duration of one webhook POST attempt"
)
UNAUTHORIZED = Counter(
    "lensbus_publisher_unauthorized_total", "Requests refused for a missing or wrong token"
)
STREAM_READY = Gauge(
    "lensbus_publisher_results_stream_ready", "1 while the JetStream results stream is in place"
)
RESULTS_NOT_STORED = Counter(
    "lensbus_publisher_results_not_stored_total",
    "Results and events seen on the results stream's subjects that JetStream did not store "
    "(its store full): live subscribers had them, a replay will not",
)
CLIPS_KEPT = Counter(
    "lensbus_publisher_clips_kept_total",
    "Clips stored, by how they ended (complete, frames_stopped, max_bytes)",
    ["ended"],
)
CLIPS_DROPPED = Counter(
    "lensbus_publisher_clips_dropped_total",
    "Clips not stored or deleted, by reason (no_frames, too_many, queue_full, no_store, "
    "too_large, failed; evicted: deleted to make room, retention by bytes)",
    ["reason"],
)
CLIP_BYTES = Counter("lensbus_publisher_clip_bytes_total", "Bytes of the clips stored")
CLIP_SECONDS = latency_histogram(
    "lensbus_publisher_clip_store_seconds", "Writing one clip: the AVI, then the object store"
)
CLIP_BUFFER_BYTES = Gauge(
    "lensbus_publisher_clip_buffer_bytes", "JPEG bytes in a camera's pre-event buffer", ["camera"]
)
CLIP_RECORDING_BYTES = Gauge(
    "lensbus_publisher_clip_recording_bytes", "JPEG bytes held by clips being recorded"
)
ZONE_EVENTS = Counter(
    "lensbus_publisher_zone_events_total",
    "Zone and line events of the analytics service taken (snapshot, page, rules)",
    ["camera", "zone", "trigger"],
)
ZONE_EVENTS_IGNORED = Counter(
    "lensbus_publisher_zone_events_ignored_total",
    "Events on the events subjects not taken, by reason (own_rule: a rule event, ours or "
    "another publisher's, coming back; own_project: a project event, taken on its project's "
    "own subject and republished there)",
    ["reason"],
)
PROJECT_OVERLAYS = Counter(
    "lensbus_publisher_project_overlays_total",
    "Overlays received from projects (ctx.overlay)",
    ["project"],
)
PROJECT_OVERLAYS_DRAWN = Counter(
    "lensbus_publisher_project_overlays_drawn_total",
    "Project stream frames drawn with a project's overlay",
    ["project"],
)
PROJECT_FRAMES = Counter(
    "lensbus_publisher_project_frames_total",
    "Frames projects drew themselves (a DeepLens function's display), received",
    ["project"],
)
PROJECT_FRAMES_SHOWN = Counter(
    "lensbus_publisher_project_frames_shown_total",
    "Frames a project drew, put on a project stream that has viewers",
    ["project"],
)
PROJECT_EVENTS = Counter(
    "lensbus_publisher_project_events_total",
    "Events projects raised (ctx.event) taken: snapshot, page, rules",
    ["project"],
)
