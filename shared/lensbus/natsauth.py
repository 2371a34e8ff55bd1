"""Who may do what on NATS: the one definition of every lensbus user's permissions.

``compose.yaml`` (through ``deploy/nats/nats-server.conf``, generated from here) and
``lensbus up`` give each service its own NATS user, allowed only its own subjects and
JetStream resources. Every user receives replies only on its own inbox prefix
``_INBOX_<user>`` (:func:`inbox_prefix`; ``lensbus.bus.connect`` passes it to nats-py), so
no user reads the replies (JetStream API answers, deployment records) meant for another.

- ``capture`` publishes frames and heartbeats, hears who wants frames (``want.frames.*``); in the KV
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
- ``publisher`` reads frames, results and heartbeats, publishes events and frame wants, manages the
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
  the cameras bucket (and ``project_list``, ``project_status``). It publishes nothing but
  frame wants (``want.frames.*``), writes no bucket, and deletes no consumer.
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

Credentials: every user but ``mqtt`` authenticates with an nkey (the config holds only its
public key; the seed stays with the user, read by nats-py to sign the server's nonce). A
CONNECT with an nkey carries no user name, so the name survives only where the client picks
its inbox: ``lensbus.bus.auth_options(user=...)`` (a service knows its role). MQTT clients
have no nkeys: ``mqtt`` keeps a password. Passwords for every user remain possible
(:func:`authorization_block`'s ``passwords``: tests, a hand-made server).

``python -m lensbus.natsauth compose-config`` writes ``deploy/nats/nats-server.conf`` (each
public nkey an environment reference ``$LENSBUS_NATS_<USER>_NKEY``, MQTT's password
``$LENSBUS_NATS_MQTT_PASSWORD``, TLS required); ``python -m lensbus.natsauth compose-setup``
makes the seeds, the CA and certificate and the ``.env`` lines compose needs
(:mod:`lensbus.cli.compose_setup`).
"""

from __future__ import annotations

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
from lensbus.natscallout import generate_nkey as generate_nkey  # "x as x": re-exported
from lensbus.natscallout import public_nkey as public_nkey
from lensbus.natsleaf import fleet_permissions
from lensbus.natsleafauth import device_user_block
from lensbus.natsmqtt import MQTT_USER, analytics_mqtt, mqtt_permissions
from lensbus.natsprojects import CALLOUT_ISSUER_ENV as CALLOUT_ISSUER_ENV
from lensbus.natsprojects import CALLOUT_SEED_ENV as CALLOUT_SEED_ENV
from lensbus.natsprojects import (
    PROJECTS_USER,
    callout_block,
    projects_service_permissions,
)
from lensbus.natsprojects import generate_callout_secrets as generate_callout_secrets
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
# A public user nkey (base32 of prefix, key and checksum).
PUBLIC_NKEY = re.compile(r"^U[A-Z2-7]{55}$")


def env_var(user: str) -> str:
    """The environment variable holding ``user``'s password (compose's ``.env``: ``mqtt``)."""
    return f"LENSBUS_NATS_{user.upper().replace('-', '_')}_PASSWORD"


def nkey_env_var(user: str) -> str:
    """The environment variable holding ``user``'s public nkey (compose's ``.env``)."""
    return f"LENSBUS_NATS_{user.upper().replace('-', '_')}_NKEY"


def nkey_users(groups: Iterable[str] = ()) -> tuple[str, ...]:
    """The users of :func:`users` that authenticate with an nkey: all but ``mqtt``."""
    return tuple(u for u in users(groups) if u != MQTT_USER)


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
    """What a program may publish: the deployer ``verbs``, that it wants a device stream,
    reading the results stream, the snapshots, the clips and the cameras bucket."""
    s = Subjects(p)
    return [
        *(f"{p}.api.deployer.{verb}" for verb in verbs),
        s.all_frames_wanted(),  # a reader of the device stream says so (lensbus.demand)
        f"{JS_API}.INFO",
        *stream_read(s.results_stream),
        *stream_read(obj_stream(s.snapshots_bucket)),
        *stream_read(obj_stream(s.clips_bucket)),
        *stream_read(kv_stream(s.cameras_bucket)),
    ]


def _publisher(s: Subjects, heartbeat: str) -> list[str]:
    p = s.prefix
    return [
        f"{p}.events.*",
        s.all_frames_wanted(),  # for its viewers, clip buffers and snapshots
        heartbeat,
        f"{JS_API}.INFO",
        *stream_admin(s.results_stream),
        *object_store(s.snapshots_bucket),
        *object_store(s.clips_bucket),
        *stream_read(kv_stream(s.cameras_bucket)),
        *stream_read(kv_stream(s.deployments_bucket)),  # the groups' pipelines: zones, lines
        f"{p}.webhooks.*",  # pending webhook deliveries, a work queue
        *stream_admin(s.webhooks_stream),
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
        return _publisher(s, heartbeat)
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
        "capture": [s.all_frames_wanted()],
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
    pub += fleet_permissions(user, p)["publish"]  # a fleet's hub or device (lensbus.natsleaf)
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


def _user_block(user: str, auth: tuple[str, str], prefix: str) -> str:
    """One user of ``authorization { users }``; ``auth``: ("nkey"|"password", config value)."""
    perms = permissions(user, prefix)
    lines = [
        "    {",
        *([f"      user: {_quote(user)}"] if auth[0] == "password" else []),
        f"      {auth[0]}: {auth[1]}",
        "      permissions: {",
        *(f"        {way}: {_allow_deny(perms[way])}" for way in ("publish", "subscribe")),
    ]
    if perms.get("allow_responses"):
        lines.append("        allow_responses: true")
    lines += ["      }", "    }"]
    return "\n".join(lines)


def _auth(
    names: Iterable[str], passwords: Mapping[str, str] | None, nkeys: Mapping[str, str] | None
) -> dict[str, tuple[str, str]]:
    """How each user authenticates: its public nkey, else its password; both None: compose's
    environment references (an nkey each, MQTT's password)."""
    if passwords is None and nkeys is None:
        return {
            u: ("password", f"${env_var(u)}") if u == MQTT_USER else ("nkey", f"${nkey_env_var(u)}")
            for u in names
        }
    auth: dict[str, tuple[str, str]] = {}
    for u in names:
        if nkeys and nkeys.get(u):
            if not PUBLIC_NKEY.fullmatch(nkeys[u]):
                raise ValueError(f"NATS user {u}: {nkeys[u]!r:.20} is not a public user nkey")
            auth[u] = ("nkey", _quote(nkeys[u]))
        elif passwords and passwords.get(u):
            auth[u] = ("password", _quote(passwords[u]))
    missing = [u for u in names if u not in auth]
    if missing:
        raise ValueError(f"no nkey or password for NATS user(s) {', '.join(missing)}")
    return auth


def authorization_block(
    passwords: Mapping[str, str] | None,
    prefix: str = DEFAULT_PREFIX,
    groups: Iterable[str] = (),
    callout: str | None = None,
    nkeys: Mapping[str, str] | None = None,
    leaf_devices: Mapping[str, str] | None = None,
) -> str:
    """nats-server config text ``authorization { users = [ ... ] }`` for every user.

    Each user authenticates with its public nkey from ``nkeys`` ("U..."), else its password
    from ``passwords``; one of them must name every user. With both ``None`` each user is an
    environment reference (``$LENSBUS_NATS_<USER>_NKEY``, ``mqtt``'s
    ``$LENSBUS_NATS_MQTT_PASSWORD``), resolved by nats-server when it reads the file: what
    compose's mounted config uses. The users are :func:`users` of ``groups`` and every
    ``inference-<group>`` user the mappings name. ``callout``: the auth callout's issuer (a
    public account nkey, or ``$VAR``) for the project users (:mod:`lensbus.natscallout`);
    every configured user bypasses it. ``leaf_devices``: a hub's devices (name -> public
    nkey), each a leaf-only user (:mod:`lensbus.natsleafauth`).
    """
    named = [*(passwords or {}), *(nkeys or {})]
    names = users([*groups, *(g for u in named if (g := _inference_group(u)))])
    auth = _auth(names, passwords, nkeys)
    devices = dict(leaf_devices or {})
    blocks = ",\n".join(
        [
            *(_user_block(u, auth[u], prefix) for u in names),
            *(device_user_block(d, key, prefix) for d, key in devices.items()),
        ]
    )
    # An nkey user is known to the server by its public key, a password user by its name.
    ids = [u if way == "password" else value.strip('"') for u, (way, value) in auth.items()]
    ids += list(devices.values())
    hook = callout_block(callout, ids) if callout else ""
    return f"authorization {{\n  users = [\n{blocks}\n  ]\n{hook}}}\n"


if __name__ == "__main__":
    # The command line (compose-config, compose-setup, permissions) lives with compose's
    # set-up; this module stays the permission set.
    from lensbus.cli.compose_setup import main

    sys.exit(main())
