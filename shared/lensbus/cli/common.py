"""What several ``lensbus`` commands share: the NATS options, argument types, the
``models`` group that packages add verbs to."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lensbus.bus import auth_options, split_servers
from lensbus.errors import InvalidName
from lensbus.subjects import DEFAULT_PREFIX, validate_prefix

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

SubParsers = argparse._SubParsersAction


def checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse ``type`` from a validator: its error becomes a usage error (exit 2)."""

    def convert(value: str) -> str:
        try:
            return check(value)
        except (InvalidName, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__
    return convert


def _file(value: str) -> str:
    """An argparse ``type``: a file that exists (named in the usage error if not)."""
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value


def add_nats_options(p: argparse.ArgumentParser) -> None:
    """``--nats-url``, the credentials and ``--prefix``, defaulting to ``$LENSBUS_NATS_URL``,
    ``$LENSBUS_NATS_NKEY``... (no secret on the command line: files only)."""
    env = os.environ.get
    p.add_argument(
        "--nats-url",
        default=env("LENSBUS_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL(s), comma-separated (default: $LENSBUS_NATS_URL or "
        f"{DEFAULT_NATS_URL}); tls://host:4222 with TLS",
    )
    p.add_argument(
        "--secrets",
        default=env("LENSBUS_SECRETS"),
        help="secrets.json of `lensbus up`: connect as the user the command needs (client to "
        "read, operator to change), with its nkey and the CA (default: $LENSBUS_SECRETS)",
    )
    p.add_argument(
        "--nkey",
        type=_file,
        default=env("LENSBUS_NATS_NKEY"),
        metavar="FILE",
        help="the NATS user's nkey seed file, e.g. client.nk (default: $LENSBUS_NATS_NKEY)",
    )
    p.add_argument(
        "--creds",
        type=_file,
        default=env("LENSBUS_NATS_CREDS"),
        metavar="FILE",
        help="a NATS .creds file (JWT user) instead (default: $LENSBUS_NATS_CREDS)",
    )
    p.add_argument(
        "--nats-user",
        default=env("LENSBUS_NATS_USER"),
        metavar="USER",
        help="whose --nkey/--creds they are (its inbox _INBOX_<USER>); default: client for "
        "the commands that read, operator for those that change (default: $LENSBUS_NATS_USER)",
    )
    p.add_argument(
        "--tls-ca",
        type=_file,
        default=env("LENSBUS_NATS_TLS_CA"),
        metavar="FILE",
        help="the CA that signed the server's certificate (ca.pem of `lensbus up` or "
        "compose-setup; default: $LENSBUS_NATS_TLS_CA, else the system's CAs)",
    )
    p.add_argument(
        "--prefix",
        type=checked(validate_prefix),
        default=env("LENSBUS_PREFIX", DEFAULT_PREFIX),
        help=f"subject prefix (default: $LENSBUS_PREFIX or {DEFAULT_PREFIX})",
    )


def models_verbs(sub: SubParsers) -> SubParsers:
    """The verbs of ``lensbus models``, creating the group if no one has yet.

    The inference package adds its own verbs (``import-darknet``, ``build-demo``) to the
    same group through the ``lensbus.commands`` entry point; whichever registers first
    creates it, the other joins it.
    """
    parser = sub.choices.get("models")
    if parser is None:
        parser = sub.add_parser("models", help="build, import, upload and list model packages")
        parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the 'models' command has no sub-commands")  # pragma: no cover


class WrongUser(Exception):
    """The credentials given cannot do what the command does (the read-only ``client`` for
    a change), or cannot be read."""


def nats_user_options(args: argparse.Namespace, user: str) -> dict[str, Any]:
    """:func:`lensbus.bus.connect` options for a command that needs the NATS ``user``
    (``client`` reads, ``operator`` changes): the URL's own ``user:password@`` (kept for
    servers with passwords), else ``--nkey``/``--creds`` (belonging to ``--nats-user``, by
    default ``user``), else ``user``'s nkey and the CA from ``--secrets``; ``--tls-ca`` in
    any case. The read-only ``client`` named for an operator's command is refused here, by
    name, rather than by the server with a timeout."""
    named = urlsplit(split_servers(args.nats_url)[0]).username
    nkey, creds = getattr(args, "nkey", None), getattr(args, "creds", None)
    who = getattr(args, "nats_user", None) or (named if named else user)
    if who == "client" and user == "operator":
        raise WrongUser(
            "this command changes the installation: connect as the NATS user 'operator' "
            "(--nkey operator.nk, or --secrets), not the read-only 'client'"
        )
    ca = getattr(args, "tls_ca", None)
    secrets = getattr(args, "secrets", None)
    try:
        if named:
            return auth_options(tls_ca=ca)
        if nkey or creds:
            return auth_options(user=who, nkey_file=nkey, creds=creds, tls_ca=ca)
        if secrets:
            return _from_secrets(Path(secrets), who, ca)
        return auth_options(tls_ca=ca)
    except ValueError as exc:
        raise WrongUser(str(exc)) from None


def _from_secrets(path: Path, user: str, ca: str | None) -> dict[str, Any]:
    """``user``'s options from ``lensbus up``'s secrets.json (its nkey and CA)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--secrets {path}: cannot read it ({exc})") from None
    try:
        if "nkeys" not in data:  # an older lensbus up's file: passwords
            password = data["passwords"][user]
            return {"user": user, "password": password, **auth_options(tls_ca=ca)}
        seed = path.parent / data["nkeys"][user]
    except (KeyError, TypeError):
        raise ValueError(f"--secrets {path}: no credentials of the user {user!r}") from None
    if not ca and data.get("tls_ca"):
        ca = str(path.parent / data["tls_ca"])
    return auth_options(user=user, nkey_file=seed, tls_ca=ca)
