"""Deployer metrics (served on the service's /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

from lensbus.metrics import latency_histogram

REQUESTS = Counter(
    "lensbus_deployer_requests_total",
    "API requests answered, by verb and outcome",
    ["verb", "code"],
)
REQUEST_SECONDS = latency_histogram(
    "lensbus_deployer_request_seconds", "Time to answer an API request", ("verb",)
)
UPLOADS = Counter(
    "lensbus_deployer_uploads_total",
    "Uploads by outcome (created, identical, refused, conflict, invalid_package, corrupt, "
    "expired, error)",
    ["outcome"],
)
UPLOAD_BYTES = Counter("lensbus_deployer_upload_bytes_total", "Bytes received in upload chunks")
UPLOADS_IN_PROGRESS = Gauge("lensbus_deployer_uploads_in_progress", "Uploads not committed yet")
COMMIT_SECONDS = Histogram(
    "lensbus_deployer_commit_seconds",
    "Time to check a package and put it in the store",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0),
)
ACTIVATIONS = Counter("lensbus_deployer_activations_total", "Desired models set by activate")
ROLLBACKS = Counter(
    "lensbus_deployer_rollbacks_total", "Rollbacks by trigger (manual, automatic)", ["trigger"]
)
DEPLOYMENTS_FAILED = Counter(
    "lensbus_deployer_deployments_failed_total",
    "Deployments an inference instance reported as failed (acted on once each)",
)
PIPELINE_CHANGES = Counter(
    "lensbus_deployer_pipeline_changes_total",
    "Pipeline revisions written, by what made them (set, rollback, model: a deploy or "
    "rollback of the group's model)",
    ["change"],
)
PIPELINES_REFUSED = Counter(
    "lensbus_deployer_pipelines_refused_total",
    "Pipelines refused by the store check (not_found: a model missing; bad_request: a task or "
    "label that does not fit)",
    ["code"],
)
PROJECT_CHANGES = Counter(
    "lensbus_deployer_project_changes_total",
    "Project uploads, deploys, rollbacks (manual and auto), removals, by verb and outcome "
    "(ok, created, identical, or the refusal's code: invalid_package, conflict, not_found, "
    "bad_request, internal; error: the deployer failed)",
    ["verb", "outcome"],
)
PROJECTS_STORED = Gauge("lensbus_deployer_projects_stored", "Project versions in the object store")
MODELS_STORED = Gauge("lensbus_deployer_models_stored", "Model versions in the object store")
STORE_BYTES = Gauge("lensbus_deployer_store_bytes", "Bytes of the object store's stream")
ORPHAN_CHUNKS_PURGED = Counter(
    "lensbus_deployer_orphan_objects_purged_total",
    "Partial objects (puts that never completed) purged from the store",
)
LEFTOVER_BYTES = Counter(
    "lensbus_deployer_leftover_bytes_removed_total",
    "Bytes of what interrupted uploads left, removed (upload_file: .part files and unpack "
    "dirs; orphan_chunks: chunks of object puts that never wrote their meta)",
    ["kind"],
)
JETSTREAM_UP = Gauge("lensbus_deployer_jetstream_up", "1 while JetStream answers")

# ---- a fleet (lensbus_deployer.fleet_*) ----------------------------------------------------------

FLEET_CHANGES = Counter(
    "lensbus_deployer_fleet_changes_total",
    "Fleet verbs that changed the hub's fleet, by verb (add, remove, deploy) and outcome (ok, "
    "or the refusal's code)",
    ["verb", "outcome"],
)
FLEET_DEVICES = Gauge("lensbus_deployer_fleet_devices", "Devices joined to this hub")
FLEET_RESULTS_LAG = Gauge(
    "lensbus_deployer_fleet_results_lag",
    "Results a device holds that the hub's fleet stream has not sourced yet (as of the last "
    "watch round)",
    ["device"],
)
FLEET_SOURCE_ACTIVE = Gauge(
    "lensbus_deployer_fleet_source_active_seconds",
    "A hub's deployer: seconds since the fleet stream last heard from a device's results "
    "source (-1: never), as of the last watch round",
    ["device"],
)
FLEET_HUB_UP = Gauge(
    "lensbus_deployer_fleet_hub_up", "A device's deployer: 1 while the hub answers"
)
FLEET_FAILURES = Counter(
    "lensbus_deployer_fleet_failures_total",
    "A device's deployer: failures, by stage (link: the hub did not answer; copy: a model not "
    "copied from the hub's store; activate: not activated here; seen: the report not written)",
    ["stage"],
)
FLEET_APPLIED = Counter(
    "lensbus_deployer_fleet_applied_total",
    "A device's deployer: desired models of the hub applied here (copied if missing, activated)",
)
FLEET_COPY_BYTES = Counter(
    "lensbus_deployer_fleet_copy_bytes_total",
    "A device's deployer: bytes of models copied from the hub's store into the local one",
)
FLEET_COPY_SECONDS = Histogram(
    "lensbus_deployer_fleet_copy_seconds",
    "A device's deployer: time to copy a model from the hub's store, check and store it",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
FLEET_SOURCE_RESTARTS = Counter(
    "lensbus_deployer_fleet_source_restarts_total",
    "A hub's deployer: a device's sources made anew when it answered again after a silence",
)
