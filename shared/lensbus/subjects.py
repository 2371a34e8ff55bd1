"""The catalogue of NATS subjects: the one place a subject string is written.

Every subject starts with a configurable prefix (``lensbus`` by default) so several
installations can share one NATS server. Camera ids, service names and instance ids
become single subject tokens, so they are validated to a safe character set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lensbus.errors import InvalidName

DEFAULT_PREFIX = "lensbus"

# NATS tokens may not contain '.', '*', '>' or whitespace. We are stricter on purpose:
# these ids also appear in URLs, file names and Prometheus labels.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_TOKEN = re.compile(TOKEN_PATTERN)
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})*$")

# Verbs of the deployer's request/reply API (``<prefix>.api.deployer.<verb>``).
DEPLOYER_VERBS = (
    "upload_begin",
    "upload_chunk",
    "upload_commit",
    "list",
    "activate",
    "rollback",
    "status",
    "pipeline_set",
    "pipeline_get",
    "pipeline_rollback",
    "project_upload_begin",
    "project_upload_chunk",
    "project_upload_commit",
    "project_list",
    "project_deploy",
    "project_rollback",
    "project_remove",
    "project_status",
)
# A hub's fleet verbs (lensbus.natsleaf), apart so a user gets them on purpose.
FLEET_VERBS = ("fleet_add", "fleet_remove", "fleet_deploy", "fleet_status")

# The subjects MQTT clients see (nats-server's MQTT listener maps topic '/' to subject '.'):
# ``<prefix>.<camera>.events`` and deeper. A camera named like one of lensbus's own second
# tokens gets no MQTT subjects: ``<prefix>.frames.events`` is camera "events"'s frames.
RESERVED_TOKENS = (
    "frames",
    "model-frames",
    "results",
    "detections",
    "events",
    "webhooks",
    "status",
    "api",
    "projects",
    "fleet",
    "want",
)
# Home Assistant's MQTT discovery prefix (its default) and its birth message's subject.
HA_PREFIX = "homeassistant"
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")

# The queue group inference instances join so that they split the frames.
INFERENCE_QUEUE_GROUP = "inference"
# The queue group deployers answer requests in, so that several can share the load.
DEPLOYER_QUEUE_GROUP = "deployer"
# Where nats-server asks who an unknown user is (auth callout, lensbus.natscallout; in the
# callout's account, not $SYS), and the queue group the projects services answer it in.
AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
AUTH_CALLOUT_QUEUE_GROUP = "projects"


def validate_token(value: str, what: str = "camera id") -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidName(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return value


def validate_topic(value: str) -> str:
    """A project's own topic: a subject token not starting with '_' (lensbus's own topics)."""
    validate_token(value, "topic")
    if value.startswith("_"):
        raise InvalidName(f"invalid topic {value!r}: topics starting with '_' are lensbus's own")
    return value


def validate_device(value: str) -> str:
    return validate_token(value, "device name")  # also its JetStream domain


def validate_camera_id(value: str) -> str:
    return validate_token(value, "camera id")


def mqtt_token(value: str) -> str:
    """``value`` (a model's label: "traffic light") as one subject token and MQTT topic level:
    characters outside A-Z, a-z, 0-9, '_' and '-' become '_' (a space has no MQTT mapping)."""
    return _NOT_TOKEN.sub("_", value)[:64] or "_"


def validate_prefix(value: str) -> str:
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise InvalidName(
            f"invalid subject prefix {value!r}: dot-separated tokens of A-Z, a-z, 0-9, '_' and '-'"
        )
    return value


@dataclass(frozen=True)
class Subjects:
    """Builds every subject lensbus uses, under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # ---- JetStream resources: named after the prefix, so installations sharing a NATS (each
    # with its own prefix) share no stream, bucket or durable consumer. The default prefix
    # gives the names lensbus always used (lensbus-models, LENSBUS_RESULTS, ...), so an
    # existing installation keeps its data. A '.' in a prefix is not allowed in a stream or
    # bucket name: buckets get '-' ("site.b" -> "site-b-models"), streams '_' and upper case
    # ("SITE_B_RESULTS"). Two prefixes differing only there (or in case) would share names.

    @property
    def install_name(self) -> str:
        """The prefix as a bucket name's head: ``lensbus``, ``site-b``."""
        return self.prefix.replace(".", "-")

    def _stream(self, what: str) -> str:
        return f"{self.prefix.replace('.', '_').replace('-', '_').upper()}_{what}"

    @property
    def models_bucket(self) -> str:
        """Object store of model packages (the deployer writes, inference reads)."""
        return f"{self.install_name}-models"

    @property
    def deployments_bucket(self) -> str:
        """KV of desired state: groups' models and pipelines, projects, reports."""
        return f"{self.install_name}-deployments"

    @property
    def cameras_bucket(self) -> str:
        """KV of the cameras capture runs and what each reports."""
        return f"{self.install_name}-cameras"

    @property
    def snapshots_bucket(self) -> str:
        """Object store of event snapshots (the publisher's)."""
        return f"{self.install_name}-snapshots"

    @property
    def clips_bucket(self) -> str:
        """Object store of clips around events (the publisher's)."""
        return f"{self.install_name}-clips"

    @property
    def projects_bucket(self) -> str:
        """Object store of packed projects (user code)."""
        return f"{self.install_name}-projects"

    @property
    def project_state_bucket_prefix(self) -> str:
        return f"{self.install_name}-project-"

    def project_state_bucket(self, project: str) -> str:
        """The KV bucket of one project's ``ctx.state`` (only that project's user may use it)."""
        return f"{self.project_state_bucket_prefix}{validate_token(project, 'project name')}"

    @property
    def results_stream(self) -> str:
        """The publisher's durable stream of results and events (replay, ``--since``)."""
        return self._stream("RESULTS")

    @property
    def webhooks_stream(self) -> str:
        """Pending webhook deliveries (a work queue: a delivery leaves it when taken). Its
        durable consumers (``webhook-<rule>``) live in this stream, so they are per prefix too."""
        return self._stream("WEBHOOKS")

    @property
    def fleet_bucket(self) -> str:
        """KV of a fleet (``lensbus.schemas.fleet`` says what its keys hold)."""
        return f"{self.install_name}-fleet"

    @property
    def fleet_results_stream(self) -> str:
        """The hub's stream of every device's results and events (sourced; no subjects)."""
        return self._stream("FLEET_RESULTS")

    def fleet_transforms(self, device: str) -> list[tuple[str, str]]:
        """``<p>.results.<cam>`` -> ``<p>.fleet.<device>.results.<cam>``, events alike."""
        fleet = f"{self.prefix}.fleet.{validate_device(device)}"
        return [
            (self.all_results(), f"{fleet}.results.{{{{wildcard(1)}}}}"),
            (self.all_events(), f"{fleet}.events.{{{{wildcard(1)}}}}"),
        ]

    def leaf_denied(self) -> list[str]:
        """What a device's leaf link must not carry either way (lensbus.natsleaf says why)."""
        return [f"{self.prefix}.>", "$KV.>", "$O.>", "$MQTT.>", f"{HA_PREFIX}.>"]

    def frames(self, camera: str) -> str:
        """Frames of one camera as captured (the device stream), JPEG in a frame envelope."""
        return f"{self.prefix}.frames.{validate_camera_id(camera)}"

    def all_frames(self) -> str:
        return f"{self.prefix}.frames.*"

    def frames_wanted(self, camera: str) -> str:
        """Where a reader of a camera's device stream says it is there (lensbus.demand)."""
        return f"{self.prefix}.want.frames.{validate_camera_id(camera)}"

    def all_frames_wanted(self) -> str:
        return f"{self.prefix}.want.frames.*"

    def model_frames(self, camera: str) -> str:
        """The same frames made smaller for inference (the model stream), when capture has a
        ``model_height``: a model of a few hundred pixels needs no 1080p JPEG."""
        return f"{self.prefix}.model-frames.{validate_camera_id(camera)}"

    def all_model_frames(self) -> str:
        return f"{self.prefix}.model-frames.*"

    def results(self, camera: str) -> str:
        """Model results for one camera."""
        return f"{self.prefix}.results.{validate_camera_id(camera)}"

    def all_results(self) -> str:
        return f"{self.prefix}.results.*"

    def detections(self, camera: str) -> str:
        """Inference's results for one camera when its group's pipeline tracks: the analytics
        service reads them in order, adds track ids and zones, and publishes the results."""
        return f"{self.prefix}.detections.{validate_camera_id(camera)}"

    def all_detections(self) -> str:
        return f"{self.prefix}.detections.*"

    def events(self, camera: str) -> str:
        """Events raised by rules for one camera."""
        return f"{self.prefix}.events.{validate_camera_id(camera)}"

    def all_events(self) -> str:
        return f"{self.prefix}.events.*"

    def webhooks(self, rule: str) -> str:
        """Pending webhook deliveries of one rule (the publisher's own work queue)."""
        return f"{self.prefix}.webhooks.{validate_token(rule, 'rule name')}"

    def all_webhooks(self) -> str:
        return f"{self.prefix}.webhooks.*"

    # ---- projects: what user code sends (lensbus.schemas.project) ------------------------------

    def project_output(self, project: str, camera: str, topic: str) -> str:
        """What ``ctx.publish(topic, ...)`` of ``project`` sends for ``camera``."""
        return f"{self._project_camera(project, camera)}.{validate_topic(topic)}"

    def project_overlay(self, project: str, camera: str) -> str:
        """Shapes the project wants drawn on ``camera``'s project stream."""
        return f"{self._project_camera(project, camera)}._overlay"

    def project_frame(self, project: str, camera: str) -> str:
        """Frames the project drew itself (a DeepLens function's local display)."""
        return f"{self._project_camera(project, camera)}._frame"

    def project_event(self, project: str, camera: str) -> str:
        """Events ``project`` raises on ``camera`` (ctx.event): its own subject proves the sender;
        the publisher checks them and republishes them on :meth:`events`."""
        return f"{self._project_camera(project, camera)}._event"

    def project_all(self, project: str) -> str:
        """Everything one project sends (its NATS user may publish only here)."""
        return f"{self.prefix}.projects.{validate_token(project, 'project name')}.>"

    def all_projects(self) -> str:
        return f"{self.prefix}.projects.>"

    def all_project_overlays(self) -> str:
        return f"{self.prefix}.projects.*.*._overlay"

    def all_project_frames(self) -> str:
        return f"{self.prefix}.projects.*.*._frame"

    def all_project_events(self) -> str:
        return f"{self.prefix}.projects.*.*._event"

    def project_parts(self, subject: str) -> tuple[str, str, str]:
        """(project, camera, topic) of a subject under :meth:`all_projects`."""
        head = f"{self.prefix}.projects."
        if not subject.startswith(head):
            raise InvalidName(f"not a project subject: {subject!r}")
        parts = subject[len(head) :].split(".")
        if len(parts) != 3:
            raise InvalidName(f"not a project subject: {subject!r}")
        return parts[0], parts[1], parts[2]

    def _project_camera(self, project: str, camera: str) -> str:
        project = validate_token(project, "project name")
        return f"{self.prefix}.projects.{project}.{validate_camera_id(camera)}"

    def status(self, service: str, instance: str) -> str:
        """Heartbeat of one service instance."""
        return (
            f"{self.prefix}.status.{validate_token(service, 'service name')}"
            f".{validate_token(instance, 'instance id')}"
        )

    def all_status(self) -> str:
        return f"{self.prefix}.status.>"

    def deployer_api(self, verb: str) -> str:
        """Request/reply endpoint of the deployer."""
        if verb not in (known := DEPLOYER_VERBS + FLEET_VERBS):
            raise InvalidName(f"unknown deployer verb {verb!r}; one of {known}")
        return f"{self.prefix}.api.deployer.{verb}"

    def camera_of(self, subject: str) -> str:
        """The camera token of a frames/results/events subject."""
        return subject.rsplit(".", 1)[-1]

    def status_matches(self, subject: str, service: str, instance: str) -> bool:
        """Whether a heartbeat naming ``service``/``instance`` came on that instance's own
        subject: permissions scope who may publish on ``<prefix>.status.<service>.>``, not
        what a payload says, so a reader trusts the payload only when the two agree."""
        return subject == f"{self.prefix}.status.{service}.{instance}"

    # ---- MQTT (through nats-server's MQTT listener) and Home Assistant ------------------------

    def mqtt_camera(self, camera: str) -> str:
        """``<prefix>.<camera>``: the root of a camera's MQTT subjects (InvalidName for a
        camera named like a lensbus subject's second token, see RESERVED_TOKENS)."""
        if validate_camera_id(camera) in RESERVED_TOKENS:
            raise InvalidName(f"camera id {camera!r} is a lensbus subject token: no MQTT topics")
        return f"{self.prefix}.{camera}"

    def mqtt_events(self, camera: str) -> str:
        """A camera's events as JSON (MQTT topic ``<prefix>/<camera>/events``)."""
        return f"{self.mqtt_camera(camera)}.events"

    def mqtt_occupancy(self, camera: str, zone: str, label: str) -> str:
        """Objects of ``label`` in ``zone`` now, a number."""
        zone = validate_token(zone, "zone name")
        return f"{self.mqtt_camera(camera)}.zone.{zone}.{mqtt_token(label)}.occupancy"

    def mqtt_line_count(self, camera: str, line: str, direction: str, label: str) -> str:
        """Crossings of ``line`` in ``direction`` by objects of ``label``, a number."""
        line, direction = validate_token(line, "line name"), validate_token(direction, "direction")
        return f"{self.mqtt_camera(camera)}.line.{line}.{direction}.{mqtt_token(label)}"

    def mqtt_all(self) -> list[str]:
        """Every MQTT subject above (for permissions)."""
        return [f"{self.prefix}.*.events", f"{self.prefix}.*.zone.>", f"{self.prefix}.*.line.>"]

    def mqtt_reserved(self) -> list[str]:
        """The lensbus subjects :meth:`mqtt_all` would also match (to deny)."""
        return [f"{self.prefix}.{token}.events" for token in RESERVED_TOKENS]

    def ha_node_id(self, camera: str) -> str:
        """Home Assistant's node id of a camera (one device per camera and prefix)."""
        return f"{self.prefix.replace('.', '_')}_{validate_camera_id(camera)}"

    def ha_sensor_config(self, node_id: str, object_id: str) -> str:
        """A sensor's discovery config (topic ``homeassistant/sensor/<node>/<object>/config``)."""
        return f"{HA_PREFIX}.sensor.{validate_token(node_id, 'node id')}.{object_id}.config"

    def ha_all_sensor_configs(self) -> str:
        return f"{HA_PREFIX}.sensor.*.*.config"

    def ha_status(self) -> str:
        """Where Home Assistant publishes ``online`` when it starts (its birth message)."""
        return f"{HA_PREFIX}.status"

    @staticmethod
    def mqtt_topic(subject: str) -> str:
        """The MQTT topic of a subject written here (its tokens hold no '.', '/' or space)."""
        return subject.replace(".", "/")


# The default installation's names, for code and tests that only ever use the default prefix.
# Services, the SDK and the permissions take them from their own ``Subjects(prefix)``.
_DEFAULT = Subjects()
MODELS_BUCKET = _DEFAULT.models_bucket
DEPLOYMENTS_BUCKET = _DEFAULT.deployments_bucket
RESULTS_STREAM = _DEFAULT.results_stream
SNAPSHOTS_BUCKET = _DEFAULT.snapshots_bucket
CAMERAS_BUCKET = _DEFAULT.cameras_bucket
CLIPS_BUCKET = _DEFAULT.clips_bucket
WEBHOOKS_STREAM = _DEFAULT.webhooks_stream
PROJECTS_BUCKET = _DEFAULT.projects_bucket
PROJECT_STATE_BUCKET_PREFIX = _DEFAULT.project_state_bucket_prefix
project_state_bucket = _DEFAULT.project_state_bucket
