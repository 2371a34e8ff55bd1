"""The NATS users of projects (issue 16): the ``projects`` service and one user per project.

A project's process (the host) connects as ``project-<name>`` (:func:`project_user`) with the
password :func:`project_password` derives from the projects service's secret (the callout
issuer's seed): nobody else can compute it. nats-server does not know these users; it asks
the projects service through the auth callout (:mod:`lensbus.natscallout`), which answers
with :func:`project_permissions`, so NATS itself enforces what user code may do:

- publish only its own outputs ``<p>.projects.<name>.>`` (topics, ``_overlay``, ``_frame``,
  ``_event``: ctx.event; the publisher checks and republishes those on ``<p>.events.*``, so
  a project cannot forge a zone event or another project's), nothing else lensbus reads;
- read frames and results of every camera (``<p>.frames.*``, ``<p>.results.*``) and its own
  inbox ``_INBOX_project-<name>``;
- its own state bucket (ctx.state; :meth:`lensbus.subjects.Subjects.project_state_bucket`,
  ``lensbus-project-<name>`` under the default prefix): get, put, delete, keys and watch;
  not creating it (the projects service creates it, with its limits, before the host
  starts: a project creating it first could leave out those limits), nor any other bucket.

The ``projects`` user (the service, :func:`projects_service_permissions`) follows the project
releases in the deployments bucket, writes only the ``project-report.*`` keys there, reads the
projects and the models object stores, answers the auth callout, and creates and manages the
state buckets. A stream name is one subject token and permissions match whole tokens only, so
"the streams ``KV_lensbus-project-*``" cannot be written: it may manage any stream but those
lensbus and nats-server's MQTT listener own (a deny list, :func:`protected_streams`). It holds
the issuer's seed, so it can mint any user anyway: its own permissions guard against its
bugs, not its intent.
"""

from __future__ import annotations

import hashlib
import hmac
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterable
from typing import Any

from lensbus.jsperms import JS_API, inbox_prefix, kv_stream, obj_stream, stream_read
from lensbus.natscallout import generate_issuer
from lensbus.schemas.project import project_report_key
from lensbus.subjects import (
    AUTH_CALLOUT_SUBJECT,
    DEFAULT_PREFIX,
    Subjects,
    validate_prefix,
    validate_token,
)

PROJECTS_USER = "projects"
PROJECT_USER_PREFIX = "project-"
# The issuer's public key (nats-server's config) and its seed (the projects service's secret).
CALLOUT_ISSUER_ENV = "LENSBUS_NATS_CALLOUT_ISSUER"
CALLOUT_SEED_ENV = "LENSBUS_PROJECTS_CALLOUT_SEED"
# Streams of nats-server's MQTT listener (server/mqtt.go), which the projects service must
# never create, change, purge or delete (nor lensbus's own: :func:`protected_streams`).
MQTT_STREAMS = ("$MQTT_msgs", "$MQTT_rmsgs", "$MQTT_sess", "$MQTT_qos2in", "$MQTT_out")


def protected_streams(prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """The streams the projects service of installation ``prefix`` must never create, change,
    purge or delete: that installation's own and the MQTT listener's."""
    s = Subjects(validate_prefix(prefix))
    return (
        kv_stream(s.deployments_bucket),
        obj_stream(s.models_bucket),
        obj_stream(s.snapshots_bucket),
        kv_stream(s.cameras_bucket),
        obj_stream(s.clips_bucket),
        obj_stream(s.projects_bucket),
        s.results_stream,
        s.webhooks_stream,
        *MQTT_STREAMS,
    )


_STREAM_ADMIN = ("CREATE", "UPDATE", "DELETE", "PURGE")


def project_user(name: str) -> str:
    """The NATS user of project ``name``'s process."""
    return f"{PROJECT_USER_PREFIX}{validate_token(name, 'project name')}"


def project_of(user: str) -> str | None:
    """The project a user name is the user of, None for any other user."""
    if not user.startswith(PROJECT_USER_PREFIX):
        return None
    name = user.removeprefix(PROJECT_USER_PREFIX)
    try:
        return validate_token(name, "project name")
    except ValueError:
        return None


def project_password(secret: str, name: str) -> str:
    """Project ``name``'s password: an HMAC-SHA256 of its name by ``secret`` (the callout
    issuer's seed), a letter then base64url (``natsauth.PASSWORD_PATTERN``-safe)."""
    mac = hmac.new(secret.encode(), f"lensbus-project:{name}".encode(), hashlib.sha256)
    return "p" + urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def state_stream(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The stream holding project ``name``'s state bucket."""
    return kv_stream(Subjects(validate_prefix(prefix)).project_state_bucket(name))


def project_permissions(name: str, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """What the user of project ``name`` may do (module docstring), in
    :func:`lensbus.natsauth.permissions`'s shape."""
    s = Subjects(validate_prefix(prefix))
    bucket = s.project_state_bucket(name)
    return {
        "publish": {
            "allow": [
                s.project_all(name),
                s.all_frames_wanted(),  # its handler reads the device stream
                f"{JS_API}.INFO",
                f"$KV.{bucket}.>",
                *stream_read(kv_stream(bucket)),
            ]
        },
        "subscribe": {
            "allow": [s.all_frames(), s.all_results(), f"{inbox_prefix(project_user(name))}.>"]
        },
    }


def project_authorizer(
    secret: str, prefix: str = DEFAULT_PREFIX, exists: Callable[[str], bool] | None = None
) -> Callable[[str, str], dict[str, Any] | None]:
    """An ``authorize(user, password)`` for :class:`lensbus.natscallout.CalloutService`: the
    permissions of ``project-<name>`` when the password is that project's (and ``exists(name)``
    holds, when given), else None."""

    def authorize(user: str, password: str) -> dict[str, Any] | None:
        name = project_of(user)
        if name is None or (exists is not None and not exists(name)):
            return None
        if not hmac.compare_digest(password.encode(), project_password(secret, name).encode()):
            return None
        return project_permissions(name, prefix)

    return authorize


def projects_service_permissions(p: str) -> dict[str, Any]:
    """The ``projects`` user's permissions (module docstring); it answers the auth callout's
    requests (``allow_responses``)."""
    s = Subjects(validate_prefix(p))
    publish = [
        f"{p}.status.{PROJECTS_USER}.>",
        f"{JS_API}.INFO",
        f"$KV.{s.deployments_bucket}.{project_report_key('*', '*')}",
        *stream_read(kv_stream(s.deployments_bucket)),
        *stream_read(obj_stream(s.projects_bucket)),
        *stream_read(obj_stream(s.models_bucket)),
        *stream_read(kv_stream(s.cameras_bucket)),  # which cameras are in a project's groups
        *(f"{JS_API}.STREAM.{verb}.*" for verb in _STREAM_ADMIN),
        f"{JS_API}.STREAM.INFO.*",
    ]
    deny = [f"{JS_API}.STREAM.{v}.{n}" for n in protected_streams(p) for v in _STREAM_ADMIN]
    return {
        "publish": {"allow": list(dict.fromkeys(publish)), "deny": deny},
        "subscribe": {"allow": [AUTH_CALLOUT_SUBJECT, f"{inbox_prefix(PROJECTS_USER)}.>"]},
        "allow_responses": True,
    }


def callout_block(issuer: str, auth_users: Iterable[str]) -> str:
    """nats-server config text (inside ``authorization {}``): unknown users go to the auth
    callout; ``auth_users`` (every configured user: its name, or its public nkey for an nkey
    user) bypass it. ``issuer`` and each of ``auth_users`` may be an environment reference
    ``$VAR`` (compose's config)."""

    def value(v: str) -> str:
        return v if v.startswith("$") else f'"{v}"'

    users = ", ".join(value(u) for u in auth_users)
    return f"  auth_callout {{\n    issuer: {value(issuer)}\n    auth_users: [{users}]\n  }}\n"


def generate_callout_secrets() -> dict[str, str]:
    """A fresh issuer for ``lensbus up``'s secrets file: ``{"issuer": "A...", "seed":
    "SA..."}``; the server's config gets the issuer, the projects service the seed."""
    seed, issuer = generate_issuer()
    return {"issuer": issuer, "seed": seed}
