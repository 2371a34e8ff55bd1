"""What several ``lensbus`` commands share: the NATS options, argument types, the
``models`` group that packages add verbs to."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from lensbus.bus import split_servers
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


def add_nats_options(p: argparse.ArgumentParser) -> None:
    """``--nats-url`` and ``--prefix``, defaulting to ``$LENSBUS_NATS_URL``/``$LENSBUS_PREFIX``."""
    p.add_argument(
        "--nats-url",
        default=os.environ.get("LENSBUS_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server URL(s), comma-separated (default: $LENSBUS_NATS_URL or "
        f"{DEFAULT_NATS_URL})",
    )
    p.add_argument(
        "--secrets",
        default=os.environ.get("LENSBUS_SECRETS"),
        help="secrets.json of `lensbus up`: when the URL names no user, connect as the user "
        "the command needs (client to read, operator to change) (default: $LENSBUS_SECRETS)",
    )
    p.add_argument(
        "--prefix",
        type=checked(validate_prefix),
        default=os.environ.get("LENSBUS_PREFIX", DEFAULT_PREFIX),
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
    """The URL names a NATS user that may not do what the command does."""


def nats_user_options(args: argparse.Namespace, user: str) -> dict[str, str]:
    """``user``/``password`` for a command that needs the NATS ``user`` (``client`` reads,
    ``operator`` changes): from ``--secrets`` when the URL names no user. A URL naming the
    read-only ``client`` for an operator's command is refused here, by name, rather than
    by the server with a timeout."""
    named = urlsplit(split_servers(args.nats_url)[0]).username
    if named == "client" and user == "operator":
        raise WrongUser(
            "this command changes the installation: connect as the NATS user 'operator' "
            "(nats://operator:<password>@host:4222, or --secrets), not the read-only 'client'"
        )
    if named or not getattr(args, "secrets", None):
        return {}
    passwords = json.loads(Path(args.secrets).read_text())["passwords"]
    return {"user": user, "password": passwords[user]}
