"""The leaf link secured: TLS on the hub's leaf port, each device a user of the hub with its own
nkey, and what a device may send into the hub.

A device's nats-server is configured by whoever holds the device, so the deny lists of its
remote (:func:`lensbus.natsleaf.device_leafnodes`) protect the device, not the hub. The hub
enforces its own: each device is a user of the hub's ``authorization { users }`` with its
public nkey, ``allowed_connection_types: ["LEAFNODE"]`` (the key opens the leaf port only),
and a publish deny list (:func:`device_permissions`): the installation's subjects and
buckets (the same list as the remote's), and every JetStream call that creates, changes or
removes a stream, a message, a consumer or the account, in any domain. What stays open is
what the fleet needs (``tests/test_fleet.py`` runs the whole fleet over this link): reads
(stream info, message get, consumers: a device's deployer reads the hub's fleet bucket and
model store), replies on inboxes, and the sourcing and flow-control subjects.

nats-server 2.15 takes no ``nkey`` or ``permissions`` inside ``leafnodes { authorization }``,
hence users of the hub's own ``authorization`` block. A hub whose clients have no users of
their own (``deploy/leaf/hub.conf``) keeps them anonymous through ``no_auth_user``: that user
may connect as a client only, so a device with no key (or a wrong one) is refused
("Authorization Violation" in the device's log; the hub's ``/leafz`` lists no leaf).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from pathlib import Path

from lensbus.jsperms import ANY_DOMAIN, JS_API, domain_api
from lensbus.natscallout import generate_nkey, public_nkey
from lensbus.natsserver import write_private
from lensbus.natstls import TlsFiles, server_block
from lensbus.subjects import DEFAULT_PREFIX, Subjects, validate_device

LEAF_CONNECTION = "LEAFNODE"
# Where a hub's anonymous clients connect as (only as clients: not as a leaf).
LOCAL_USER = "local"
CLIENT_CONNECTIONS = ("STANDARD", "WEBSOCKET")
# The JetStream calls a device may not make anywhere through the link (after $JS[.<d>].API.).
API_WRITES = (
    "STREAM.CREATE.>",
    "STREAM.UPDATE.>",
    "STREAM.DELETE.>",
    "STREAM.PURGE.>",
    "STREAM.MSG.DELETE.>",
    "STREAM.RESTORE.>",
    "STREAM.SNAPSHOT.>",
    "STREAM.PEER.>",
    "STREAM.LEADER.>",
    "CONSUMER.DELETE.>",
    "CONSUMER.PAUSE.>",
    "META.>",
    "SERVER.>",
    "ACCOUNT.>",
)
# A public user nkey, or an environment reference nats-server resolves ($NAME).
_PUBLIC_OR_ENV = re.compile(r"U[A-Z2-7]{55}|\$[A-Za-z_][A-Za-z0-9_]*")


def device_permissions(prefix: str = DEFAULT_PREFIX) -> dict[str, list[str]]:
    """What a device's leaf connection may not publish into the hub."""
    deny = [*Subjects(prefix).leaf_denied(), "$SYS.>"]
    for api in (domain_api(ANY_DOMAIN), JS_API):
        deny += [f"{api}.{call}" for call in API_WRITES]
    return {"deny": deny}


def parse_device_key(value: str) -> tuple[str, str]:
    """``D1=U...`` (or ``D1=$VAR``) from the command line: (device, public key)."""
    device, sep, key = value.partition("=")
    if not sep:
        raise ValueError(f"--device {value!r}: give NAME=PUBLIC_NKEY (U...) or NAME=$VAR")
    validate_device(device)
    if not _PUBLIC_OR_ENV.fullmatch(key):
        raise ValueError(f"--device {device}: {key!r:.20} is not a public user nkey (U...)")
    return device, key


def _quoted(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _key(value: str) -> str:
    return value if value.startswith("$") else f'"{value}"'


def device_user_block(device: str, public_key: str, prefix: str = DEFAULT_PREFIX) -> str:
    """One device of the hub's ``authorization { users }``: a leaf connection only."""
    validate_device(device)
    deny = "".join(f'          "{subject}",\n' for subject in device_permissions(prefix)["deny"])
    return (
        f"    {{  # device {device}\n"
        f"      nkey: {_key(public_key)}\n"
        f'      allowed_connection_types: ["{LEAF_CONNECTION}"]\n'
        f"      permissions: {{\n        publish: {{ deny: [\n{deny}        ] }}\n      }}\n"
        "    }"
    )


def hub_authorization(devices: Mapping[str, str], prefix: str = DEFAULT_PREFIX) -> str:
    """A hub's ``authorization`` block when its clients have no users of their own: the
    devices, and an anonymous client user (``no_auth_user``) that cannot open a leaf link."""
    if not devices:
        return ""
    clients = _quoted(list(CLIENT_CONNECTIONS))
    local = f'    {{ user: "{LOCAL_USER}", allowed_connection_types: {clients} }}'
    users = ",\n".join([local, *(device_user_block(d, k, prefix) for d, k in devices.items())])
    return f'authorization {{\n  users = [\n{users}\n  ]\n}}\nno_auth_user: "{LOCAL_USER}"\n'


def leaf_tls(files: TlsFiles) -> str:
    """The hub's ``leafnodes`` TLS: its server certificate on the leaf port."""
    return textwrap.indent(server_block(files), "  ")


def remote_auth(nkey: str | None = None, tls_ca: str | Path | None = None) -> str:
    """A device's remote: its seed (``SU...`` or ``$VAR``) and the CA it trusts the hub by."""
    lines = []
    if nkey:
        if not (nkey.startswith("SU") or nkey.startswith("$")):
            raise ValueError("the leaf link's nkey: a user seed (SU...) or $VAR")
        lines.append(f"      nkey: {_key(nkey)}")
    if tls_ca:
        lines.append(f'      tls {{ ca_file: "{tls_ca}" }}')
    return "".join(f"\n{line}" for line in lines)


def new_device_key(path: Path) -> str:
    """A fresh seed for a device's leaf link, written 0600 to ``path``; its public key (what
    the hub's config names). An existing file is kept: replacing a key is a rotation."""
    if path.exists():
        raise ValueError(f"{path} exists: remove it first to make a new key (a rotation)")
    seed = generate_nkey()
    write_private(path, seed + "\n")
    return public_nkey(seed)
