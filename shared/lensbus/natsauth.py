"""Who may do what on NATS: the one definition of every lensbus user's permissions.

``compose.yaml`` (through ``deploy/nats/nats-server.conf``, generated from here) and
``lensbus up`` give each service its own NATS user, allowed only its own subjects and
JetStream resources:

- ``capture`` publishes frames (device and model streams) and its heartbeats; in the KV
  ``lensbus-cameras`` it reads every key, writes only the ``state.*`` keys (what it reports
  about its cameras), and may create the bucket; nothing else (not results, no other bucket).
- ``inference`` reads frames (either stream), publishes results, reads the desired models (KV
  ``lensbus-deployments``) and the model store, and writes only its own swap reports
  (``report.>`` keys), never the ``group.*`` keys.
- ``deployer`` answers ``<prefix>.api.deployer.*``, reads heartbeats, and is the only one
  that writes the model store and the ``group.*`` keys.
- ``publisher`` reads frames, results and heartbeats, publishes events, manages the
  results stream and the snapshots and clips object stores, and reads the cameras bucket.
- ``client`` (programs, the ``lensbus`` command): reads frames, results, events and
  heartbeats, calls the deployer's API, reads the results stream, the snapshots, the clips
  and the cameras bucket, and writes the ``camera.*`` keys of the cameras bucket (``lensbus
  cameras add/update/remove``; it may create that bucket); it publishes no frames, results or
  events and writes no other bucket.

The JetStream API subjects were found by running every service with its own user against a
real ``nats-server`` (``tests/test_natsauth.py`` does it again on every run).

``python -m lensbus.natsauth compose-config`` writes ``deploy/nats/nats-server.conf`` (the
passwords are ``$LENSBUS_NATS_<USER>_PASSWORD`` environment references);
``python -m lensbus.natsauth passwords`` prints fresh ``LENSBUS_NATS_<USER>_PASSWORD=...``
lines for a ``.env``.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from collections.abc import Mapping
from typing import Any

from lensbus.schemas.camera import camera_key, state_key
from lensbus.subjects import (
    CAMERAS_BUCKET,
    CLIPS_BUCKET,
    DEFAULT_PREFIX,
    DEPLOYMENTS_BUCKET,
    MODELS_BUCKET,
    RESULTS_STREAM,
    SNAPSHOTS_BUCKET,
    validate_prefix,
)

USERS: tuple[str, ...] = ("capture", "inference", "deployer", "publisher", "client")

# JetStream keeps a KV bucket B in the stream KV_B (subjects $KV.B.<key>) and an object
# store B in the stream OBJ_B (subjects $O.B.C.<nuid> for chunks, $O.B.M.<name> for meta).
DEPLOYMENTS_STREAM = f"KV_{DEPLOYMENTS_BUCKET}"
MODELS_STREAM = f"OBJ_{MODELS_BUCKET}"
SNAPSHOTS_STREAM = f"OBJ_{SNAPSHOTS_BUCKET}"
CAMERAS_STREAM = f"KV_{CAMERAS_BUCKET}"
CLIPS_STREAM = f"OBJ_{CLIPS_BUCKET}"

JS_API = "$JS.API"
# Replies to requests (the JetStream API's, the deployer's) come to the requester's inbox.
INBOX = "_INBOX.>"

# A password from generate_passwords(): also safe unquoted in a nats-server config value
# (a leading digit would be read as a number) and in a nats:// URL.
PASSWORD_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{15,}$")


def env_var(user: str) -> str:
    """The environment variable holding ``user``'s password (compose's ``.env``)."""
    return f"LENSBUS_NATS_{user.upper()}_PASSWORD"


def stream_read(stream: str) -> list[str]:
    """Publish permissions to read a stream: its info, direct and stored-message gets, and
    consumers of its own (ephemeral, ordered or durable) with their acks and flow control.

    ``STREAM.NAMES`` (the names of the account's streams, nothing else) is how nats-py finds
    the stream of a subject when it subscribes (KV watch, object store get)."""
    return [
        f"{JS_API}.STREAM.NAMES",
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def stream_admin(stream: str) -> list[str]:
    """Reading plus creating, updating and purging a stream (not deleting it)."""
    return [
        f"{JS_API}.STREAM.CREATE.{stream}",
        f"{JS_API}.STREAM.UPDATE.{stream}",
        f"{JS_API}.STREAM.PURGE.{stream}",
        f"{JS_API}.STREAM.MSG.DELETE.{stream}",
        *stream_read(stream),
    ]


def cameras_bucket(keys: str) -> list[str]:
    """Writing the ``keys`` of the cameras bucket, reading all of it, and creating it where
    missing (capture and the CLI both may come first); never updating its limits, purging
    or deleting it."""
    return [
        f"$KV.{CAMERAS_BUCKET}.{keys}",
        f"{JS_API}.STREAM.CREATE.{CAMERAS_STREAM}",
        *stream_read(CAMERAS_STREAM),
    ]


def object_store(bucket: str) -> list[str]:
    """Writing (chunks, meta) and managing the object store ``bucket``."""
    return [f"$O.{bucket}.>", *stream_admin(f"OBJ_{bucket}")]


def permissions(user: str, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """NATS permissions of one lensbus user under a subject prefix.

    ``{"publish": {"allow": [...]}, "subscribe": {"allow": [...]}}``; the deployer's also has
    ``"allow_responses": True`` (it answers on reply subjects, and no other inbox).
    """
    p = validate_prefix(prefix)
    frames, results, events = f"{p}.frames.*", f"{p}.results.*", f"{p}.events.*"
    model_frames = f"{p}.model-frames.*"
    status, api = f"{p}.status.>", f"{p}.api.deployer.*"
    heartbeat = f"{p}.status.{user}.>"
    if user == "capture":
        pub, sub = [frames, model_frames, heartbeat, *cameras_bucket(state_key("*"))], [INBOX]
    elif user == "inference":
        pub = [
            results,
            heartbeat,
            f"$KV.{DEPLOYMENTS_BUCKET}.report.>",
            *stream_read(DEPLOYMENTS_STREAM),
            *stream_read(MODELS_STREAM),
        ]
        sub = [frames, model_frames, INBOX]
    elif user == "deployer":
        pub = [
            heartbeat,
            f"{JS_API}.INFO",
            f"$KV.{DEPLOYMENTS_BUCKET}.>",
            *stream_admin(DEPLOYMENTS_STREAM),
            *object_store(MODELS_BUCKET),
        ]
        sub = [api, status, INBOX]
        return {
            "publish": {"allow": _unique(pub)},
            "subscribe": {"allow": sub},
            "allow_responses": True,
        }
    elif user == "publisher":
        pub = [
            events,
            heartbeat,
            f"{JS_API}.INFO",
            *stream_admin(RESULTS_STREAM),
            *object_store(SNAPSHOTS_BUCKET),
            *object_store(CLIPS_BUCKET),
            *stream_read(CAMERAS_STREAM),
        ]
        sub = [frames, results, events, status, INBOX]
    elif user == "client":
        pub = [
            api,
            f"{JS_API}.INFO",
            *stream_read(RESULTS_STREAM),
            *stream_read(SNAPSHOTS_STREAM),
            *stream_read(CLIPS_STREAM),
            *cameras_bucket(camera_key("*")),
        ]
        sub = [frames, results, events, status, INBOX]
    else:
        raise ValueError(f"unknown lensbus NATS user {user!r}; one of {', '.join(USERS)}")
    return {"publish": {"allow": _unique(pub)}, "subscribe": {"allow": sub}}


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def generate_passwords() -> dict[str, str]:
    """A fresh random password for every user (URL- and config-safe, 32+ characters)."""
    return {user: "p" + secrets.token_urlsafe(24) for user in USERS}


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


def _list(items: list[str]) -> str:
    return "[" + ", ".join(_quote(s) for s in items) + "]"


def _user_block(user: str, password: str | None, prefix: str) -> str:
    perms = permissions(user, prefix)
    secret = f"${env_var(user)}" if password is None else _quote(password)
    lines = [
        "    {",
        f"      user: {_quote(user)}",
        f"      password: {secret}",
        "      permissions: {",
        f"        publish: {{ allow: {_list(perms['publish']['allow'])} }}",
        f"        subscribe: {{ allow: {_list(perms['subscribe']['allow'])} }}",
    ]
    if perms.get("allow_responses"):
        lines.append("        allow_responses: true")
    lines += ["      }", "    }"]
    return "\n".join(lines)


def authorization_block(passwords: Mapping[str, str] | None, prefix: str = DEFAULT_PREFIX) -> str:
    """nats-server config text ``authorization { users = [ ... ] }`` for every user.

    With ``passwords`` ``None`` each password is the environment reference
    ``$LENSBUS_NATS_<USER>_PASSWORD`` (resolved by nats-server when it reads the file: what
    compose's mounted config uses); otherwise ``passwords`` must name every user.
    """
    if passwords is not None:
        missing = [u for u in USERS if not passwords.get(u)]
        if missing:
            raise ValueError(f"no password for NATS user(s) {', '.join(missing)}")
    users = ",\n".join(
        _user_block(u, None if passwords is None else passwords[u], prefix) for u in USERS
    )
    return f"authorization {{\n  users = [\n{users}\n  ]\n}}\n"


COMPOSE_HEADER = """\
# nats-server config of compose.yaml: JetStream on the named volume, frames up to 8 MiB,
# one user per lensbus service with only its own subjects and buckets.
# GENERATED by `python -m lensbus.natsauth compose-config` from shared/lensbus/natsauth.py:
# edit that, not this (tests/test_natsauth.py fails when they differ). The passwords are
# environment references, set from .env by compose (LENSBUS_NATS_<USER>_PASSWORD).
"""


def compose_config(prefix: str = DEFAULT_PREFIX) -> str:
    """The whole ``deploy/nats/nats-server.conf`` compose.yaml mounts into the nats service."""
    from lensbus.natsserver import MAX_PAYLOAD

    return (
        COMPOSE_HEADER
        + "\n"
        + 'server_name: "lensbus"\n'
        + "port: 4222\n"
        + "# monitoring (/healthz for the container healthcheck); not published on the host\n"
        + "http_port: 8222\n"
        + f"max_payload: {MAX_PAYLOAD}\n"
        + "jetstream {\n"
        + '  store_dir: "/data/jetstream"\n'
        + "}\n\n"
        + authorization_block(None, prefix)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lensbus.natsauth", description="lensbus NATS users and permissions"
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix")
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    sub.add_parser("compose-config", help="deploy/nats/nats-server.conf (env passwords)")
    sub.add_parser("passwords", help="fresh LENSBUS_NATS_<USER>_PASSWORD=... lines")
    sub.add_parser("permissions", help="every user's permissions as JSON")
    args = parser.parse_args(argv)
    if args.what == "compose-config":
        sys.stdout.write(compose_config(args.prefix))
    elif args.what == "passwords":
        for user, password in generate_passwords().items():
            print(f"{env_var(user)}={password}")
    else:
        print(json.dumps({u: permissions(u, args.prefix) for u in USERS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
