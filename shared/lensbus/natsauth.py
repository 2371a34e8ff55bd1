"""Who may do what on NATS: the one definition of every lensbus user's permissions.

``compose.yaml`` (through ``deploy/nats/nats-server.conf``, generated from here) and
``lensbus up`` give each service its own NATS user, allowed only its own subjects and
JetStream resources. Every user receives replies only on its own inbox prefix
``_INBOX_<user>`` (:func:`inbox_prefix`; ``lensbus.bus.connect`` passes it to nats-py), so
no user reads the replies (JetStream API answers, deployment records) meant for another.

- ``capture`` publishes frames (device and model streams) and its heartbeats; in the KV
  ``lensbus-cameras`` it reads every key, writes only the ``state.*`` keys (what it reports
  about its cameras), and may create the bucket; nothing else (not results, no other bucket).
- ``inference`` reads frames (either stream), publishes results, reads the desired models (KV
  ``lensbus-deployments``) and the model store, and writes only the swap reports of the
  camera group ``default`` (``report.default.<instance>``), never the ``group.*`` keys nor
  another group's reports. An instance serving group ``G`` connects as ``inference-G``
  (:func:`inference_user`; ``--inference-group G`` adds it to the generated config), whose
  reports are ``report.G.*``. Scoping a report to one instance would need a user per instance:
  plain config-file users have no permission templates (``{{name()}}`` is for JWT users), so
  the group is the scope, and the deployer refuses a report whose payload names another
  group or instance than its key.
- ``deployer`` answers ``<prefix>.api.deployer.*``, reads heartbeats, and is the only one
  that writes the model store and the ``group.*`` keys.
- ``publisher`` reads frames, results and heartbeats, publishes events, manages the
  results stream and the snapshots and clips object stores, and reads the cameras bucket.
- ``analytics`` reads the tracking groups' results (``detections.*``), publishes the
  tracked results and the zone events (``results.*``, ``events.*``) and its heartbeats, and
  reads the deployments bucket (the groups' pipelines); it writes no bucket. It also
  publishes the MQTT subjects and Home Assistant's discovery configs (:mod:`lensbus.natsmqtt`).
- ``mqtt`` (MQTT clients: Home Assistant) reads only those; see :mod:`lensbus.natsmqtt`.
- ``projects`` (the service) and ``project-<name>`` (a project's process: not in the config,
  authorised by the auth callout): :mod:`lensbus.natsprojects`. The deployer stores projects
  too; the publisher reads their overlays and frames, the client and operator their outputs.
- ``client`` (programs, viewers; the ``lensbus`` command's read verbs) is read-only: frames,
  results, events and heartbeats, the deployer's ``list`` and ``status``, the results stream
  (with consumers of its own: ordered, ephemeral or durable), the snapshots, the clips and
  the cameras bucket (and ``project_list``, ``project_status``). It publishes nothing, writes
  no bucket, and deletes no consumer.
- ``operator`` (``lensbus models upload``, ``deploy``, ``rollback``, ``cameras
  add/update/remove``): all the client may, plus every deployer verb, the ``camera.*`` keys of
  the cameras bucket (it may create that bucket), and deleting consumers of the results
  stream. A consumer's name is one subject token and permissions match whole tokens only, so
  deleting "only the consumers it created" cannot be expressed: only the operator deletes.

Heartbeats are also checked against their subject by every reader
(:meth:`lensbus.subjects.Subjects.status_matches`): ``capture`` may publish only on
``<prefix>.status.capture.>``, so it cannot speak for inference.

The JetStream API subjects were found by running every service with its own user against a
real ``nats-server`` (``tests/test_natsauth.py`` does it again on every run).

``python -m lensbus.natsauth compose-config`` writes ``deploy/nats/nats-server.conf`` (the
passwords are ``$LENSBUS_NATS_<USER>_PASSWORD`` environment references);
``python -m lensbus.natsauth passwords`` prints fresh ``LENSBUS_NATS_<USER>_PASSWORD=...``
lines for a ``.env`` (and the callout's ``LENSBUS_NATS_CALLOUT_ISSUER`` and
``LENSBUS_PROJECTS_CALLOUT_SEED``).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from lensbus.jsperms import (
    JS_API,
    cameras_bucket,
    kv_stream,
    obj_stream,
    object_store,
    stream_admin,
    stream_read,
)
from lensbus.jsperms import inbox_prefix as inbox_prefix  # "x as x": re-exported (and below)
from lensbus.natsmqtt import (
    DEFAULT_MQTT_PORT,
    MQTT_USER,
    analytics_mqtt,
    mqtt_block,
    mqtt_permissions,
)
from lensbus.natsprojects import (
    CALLOUT_ISSUER_ENV,
    CALLOUT_SEED_ENV,
    PROJECTS_USER,
    callout_block,
    generate_callout_secrets,
    projects_service_permissions,
)
from lensbus.natsprojects import project_authorizer as project_authorizer
from lensbus.natsprojects import project_password as project_password
from lensbus.natsprojects import project_permissions as project_permissions
from lensbus.natsprojects import project_user as project_user
from lensbus.schemas.camera import camera_key, state_key
from lensbus.schemas.deploy import report_key
from lensbus.subjects import (
    DEFAULT_PREFIX,
    DEPLOYER_VERBS,
    Subjects,
    validate_prefix,
    validate_token,
)

USERS: tuple[str, ...] = (
    "capture",
    "inference",
    "deployer",
    "publisher",
    "analytics",
    PROJECTS_USER,
    "client",
    "operator",
    MQTT_USER,
)

# The camera group the plain ``inference`` user reports for; ``inference-<group>`` for others.
DEFAULT_GROUP = "default"
INFERENCE = "inference"
# The deployer verbs a read-only user may call: they change nothing.
READ_VERBS = ("list", "status", "pipeline_get", "project_list", "project_status")

# A password from generate_passwords(): also safe unquoted in a nats-server config value
# (a leading digit would be read as a number) and in a nats:// URL.
PASSWORD_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{15,}$")


def env_var(user: str) -> str:
    """The environment variable holding ``user``'s password (compose's ``.env``)."""
    return f"LENSBUS_NATS_{user.upper().replace('-', '_')}_PASSWORD"


def inference_user(group: str) -> str:
    """The NATS user of the inference instances serving camera group ``group``."""
    return INFERENCE if group == DEFAULT_GROUP else f"{INFERENCE}-{validate_token(group, 'group')}"


def users(groups: Iterable[str] = ()) -> tuple[str, ...]:
    """Every user of a configuration: :data:`USERS` and an inference user per extra group."""
    extra = [inference_user(g) for g in groups if g != DEFAULT_GROUP]
    return tuple(dict.fromkeys([*USERS, *extra]))


def _inference_group(user: str) -> str | None:
    if user == INFERENCE:
        return DEFAULT_GROUP
    if user.startswith(f"{INFERENCE}-"):
        return validate_token(user.removeprefix(f"{INFERENCE}-"), "group")
    return None


def _client(p: str, verbs: Iterable[str]) -> list[str]:
    """What a program may publish: the deployer ``verbs``, reading the results stream, the
    snapshots, the clips and the cameras bucket."""
    s = Subjects(p)
    return [
        *(f"{p}.api.deployer.{verb}" for verb in verbs),
        f"{JS_API}.INFO",
        *stream_read(s.results_stream),
        *stream_read(obj_stream(s.snapshots_bucket)),
        *stream_read(obj_stream(s.clips_bucket)),
        *stream_read(kv_stream(s.cameras_bucket)),
    ]


def _publish(user: str, p: str) -> list[str]:
    heartbeat, s = f"{p}.status.{user}.>", Subjects(p)
    deployments = kv_stream(s.deployments_bucket)
    group = _inference_group(user)
    if group is not None:
        return [
            f"{p}.results.*",
            f"{p}.detections.*",  # a group's results before its pipeline's analytics
            f"{p}.status.{INFERENCE}.>",
            f"$KV.{s.deployments_bucket}.{report_key(group, '*')}",
            *stream_read(deployments),
            *stream_read(obj_stream(s.models_bucket)),
        ]
    if user == "capture":
        return [
            f"{p}.frames.*",
            f"{p}.model-frames.*",
            heartbeat,
            *cameras_bucket(s, state_key("*")),
        ]
    if user == "deployer":
        return [
            heartbeat,
            f"{JS_API}.INFO",
            f"$KV.{s.deployments_bucket}.>",
            *stream_admin(deployments),
            *object_store(s.models_bucket),
            *object_store(s.projects_bucket),
        ]
    if user == "publisher":
        return [
            f"{p}.events.*",
            heartbeat,
            f"{JS_API}.INFO",
            *stream_admin(s.results_stream),
            *object_store(s.snapshots_bucket),
            *object_store(s.clips_bucket),
            *stream_read(kv_stream(s.cameras_bucket)),
            *stream_read(deployments),  # the groups' pipelines: zones and lines drawn
            f"{p}.webhooks.*",  # pending webhook deliveries, a work queue
            *stream_admin(s.webhooks_stream),
        ]
    if user == "analytics":
        mqtt = analytics_mqtt(p)["publish"]
        return [
            f"{p}.results.*",
            f"{p}.events.*",
            heartbeat,
            *stream_read(deployments),
            *mqtt,
        ]
    if user == "client":
        return _client(p, READ_VERBS)
    if user == "operator":
        return [
            *_client(p, DEPLOYER_VERBS),
            *cameras_bucket(s, camera_key("*")),
            f"{JS_API}.CONSUMER.DELETE.{s.results_stream}.*",
        ]
    raise ValueError(f"unknown lensbus NATS user {user!r}; one of {', '.join(USERS)}")


def _subscribe(user: str, p: str) -> list[str]:
    frames, status = [f"{p}.frames.*", f"{p}.model-frames.*"], f"{p}.status.>"
    if _inference_group(user) is not None:
        return frames
    s = Subjects(p)
    # the project streams, and project events (checked, then republished on events.*)
    drawn = [s.all_project_overlays(), s.all_project_frames(), s.all_project_events()]
    reader = [f"{p}.frames.*", f"{p}.results.*", f"{p}.events.*", status, s.all_projects()]
    return {
        "capture": [],
        "deployer": [f"{p}.api.deployer.*", status],
        "publisher": [f"{p}.frames.*", f"{p}.results.*", f"{p}.events.*", status, *drawn],
        "analytics": [f"{p}.detections.*", *analytics_mqtt(p)["subscribe"]],
        "client": reader,
        "operator": reader,
    }[user]


def permissions(user: str, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """NATS permissions of one lensbus user (:func:`users`) under a subject prefix.

    ``{"publish": {"allow": [...]}, "subscribe": {"allow": [...]}}``; the deployer's also has
    ``"allow_responses": True`` (it answers on reply subjects, and no other inbox). Each user
    subscribes to its own inbox, ``_INBOX_<user>.>``, and no other. The projects service's
    and a project's: :mod:`lensbus.natsprojects`.
    """
    p = validate_prefix(prefix)
    if user == MQTT_USER:
        return mqtt_permissions(p)
    if user == PROJECTS_USER:
        return projects_service_permissions(p)
    pub = _publish(user, p)  # first: it refuses an unknown user
    sub = [*_subscribe(user, p), f"{inbox_prefix(user)}.>"]
    perms: dict[str, Any] = {"publish": {"allow": _unique(pub)}, "subscribe": {"allow": sub}}
    if user == "deployer":
        perms["allow_responses"] = True
    if user == "analytics":  # its MQTT wildcards also match these lensbus subjects
        perms["publish"]["deny"] = analytics_mqtt(p)["deny"]
    return perms


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def generate_passwords(groups: Iterable[str] = ()) -> dict[str, str]:
    """A fresh random password for every user of :func:`users` (URL- and config-safe, 32+
    characters)."""
    return {user: "p" + secrets.token_urlsafe(24) for user in users(groups)}


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


def _list(items: list[str]) -> str:
    return "[" + ", ".join(_quote(s) for s in items) + "]"


def _allow_deny(perm: dict[str, list[str]]) -> str:
    deny = f", deny: {_list(perm['deny'])}" if perm.get("deny") else ""
    return f"{{ allow: {_list(perm['allow'])}{deny} }}"


def _user_block(user: str, password: str | None, prefix: str) -> str:
    perms = permissions(user, prefix)
    secret = f"${env_var(user)}" if password is None else _quote(password)
    lines = [
        "    {",
        f"      user: {_quote(user)}",
        f"      password: {secret}",
        "      permissions: {",
        *(f"        {way}: {_allow_deny(perms[way])}" for way in ("publish", "subscribe")),
    ]
    if perms.get("allow_responses"):
        lines.append("        allow_responses: true")
    lines += ["      }", "    }"]
    return "\n".join(lines)


def authorization_block(
    passwords: Mapping[str, str] | None,
    prefix: str = DEFAULT_PREFIX,
    groups: Iterable[str] = (),
    callout: str | None = None,
) -> str:
    """nats-server config text ``authorization { users = [ ... ] }`` for every user.

    With ``passwords`` ``None`` each password is the environment reference
    ``$LENSBUS_NATS_<USER>_PASSWORD`` (resolved by nats-server when it reads the file: what
    compose's mounted config uses); otherwise ``passwords`` must name every user. The users
    are :func:`users` of ``groups`` and, with ``passwords``, every ``inference-<group>`` user
    it names. ``callout``: the auth callout's issuer (a public account nkey, or ``$VAR``) for
    the project users (:mod:`lensbus.natscallout`); every configured user bypasses it.
    """
    names = users(groups)
    if passwords is not None:
        names = users([*groups, *(g for u in passwords if (g := _inference_group(u)))])
        missing = [u for u in names if not passwords.get(u)]
        if missing:
            raise ValueError(f"no password for NATS user(s) {', '.join(missing)}")
    blocks = ",\n".join(
        _user_block(u, None if passwords is None else passwords[u], prefix) for u in names
    )
    hook = callout_block(callout, names) if callout else ""
    return f"authorization {{\n  users = [\n{blocks}\n  ]\n{hook}}}\n"


COMPOSE_HEADER = """\
# nats-server config of compose.yaml: JetStream on the named volume, frames up to 8 MiB,
# one user per lensbus service with only its own subjects and buckets.
# GENERATED by `python -m lensbus.natsauth compose-config` from shared/lensbus/natsauth.py:
# edit that, not this (tests/test_natsauth.py fails when they differ). The passwords are
# environment references, set from .env by compose (LENSBUS_NATS_<USER>_PASSWORD), and so
# is the auth callout's issuer (LENSBUS_NATS_CALLOUT_ISSUER; the project users).
"""


def compose_config(prefix: str = DEFAULT_PREFIX, groups: Iterable[str] = ()) -> str:
    """The whole ``deploy/nats/nats-server.conf`` compose.yaml mounts into the nats service."""
    from lensbus.natsserver import MAX_PAYLOAD

    return f"""{COMPOSE_HEADER}
server_name: "lensbus"
port: 4222
# monitoring (/healthz for the container healthcheck); not published on the host
http_port: 8222
max_payload: {MAX_PAYLOAD}
jetstream {{
  store_dir: "/data/jetstream"
}}
# MQTT clients (Home Assistant) as the user `mqtt`: lensbus.natsmqtt
{mqtt_block(DEFAULT_MQTT_PORT)}
{authorization_block(None, prefix, groups, f"${CALLOUT_ISSUER_ENV}")}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lensbus.natsauth", description="lensbus NATS users and permissions"
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix")
    parser.add_argument(
        "--inference-group",
        action="append",
        default=[],
        metavar="GROUP",
        help="add the user inference-GROUP for the instances serving GROUP (repeatable)",
    )
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    sub.add_parser("compose-config", help="deploy/nats/nats-server.conf (env passwords)")
    sub.add_parser("passwords", help="fresh LENSBUS_NATS_<USER>_PASSWORD=... (and callout) lines")
    sub.add_parser("permissions", help="every user's permissions as JSON")
    args = parser.parse_args(argv)
    if args.what == "compose-config":
        sys.stdout.write(compose_config(args.prefix, args.inference_group))
    elif args.what == "passwords":
        for user, password in generate_passwords(args.inference_group).items():
            print(f"{env_var(user)}={password}")
        callout = generate_callout_secrets()
        print(f"{CALLOUT_ISSUER_ENV}={callout['issuer']}\n{CALLOUT_SEED_ENV}={callout['seed']}")
    else:
        names = users(args.inference_group)
        print(json.dumps({u: permissions(u, args.prefix) for u in names}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
