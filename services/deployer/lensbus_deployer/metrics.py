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
