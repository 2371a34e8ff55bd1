"""Devices as leaf nodes of a hub: the nats-server blocks of each side, and what the leaf link
must not carry.

The **hub** runs a nats-server with JetStream domain ``hub`` (configurable) and a
``leafnodes { listen }``; a **device** runs its own nats-server, its JetStream domain its
name, with one leaf remote to the hub (an outbound connection only). Every service of a device
connects to its own server, so the device captures, infers, stores results and serves its page
with the hub unreachable.

One account spans the link, so subscription interest crosses it: a hub subscriber of frames
would pull every device's frames over the link, a stream on the hub over ``<p>.results.*``
would store every device's results, and a bucket that exists on both sides would store the
other side's writes. The device's remote therefore denies, both ways (``deny_imports`` and
``deny_exports``), :meth:`lensbus.subjects.Subjects.leaf_denied`: the installation's subjects,
``$KV.>``, ``$O.>``, ``$MQTT.>`` and Home Assistant's. What must pass, found with a real hub
and device (``tests/test_fleet.py``): JetStream's cross-domain API (``$JS.<domain>.API.>``,
which nats-server maps to the domain's own API; it keeps ``$JS.API.>`` itself from crossing
between domains), the inboxes its replies and consumers' deliveries use, and the sourcing and
flow-control subjects. So the hub's fleet stream sources each device's results stream through
``$JS.<device>.API``, the hub's fleet bucket sources each device's ``seen.<device>``, and a
device's deployer reads the hub's fleet bucket and model store through ``$JS.hub.API``.

``python -m lensbus.natsleaf hub-config|device-config`` prints a whole server config for
``deploy/leaf/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from lensbus.jsperms import (
    ANY_DOMAIN,
    account_info,
    domain_api,
    kv_stream,
    kv_subject,
    obj_stream,
    stream_admin,
    stream_read,
)
from lensbus.natsleafauth import (
    hub_authorization,
    leaf_tls,
    new_device_key,
    parse_device_key,
    remote_auth,
)
from lensbus.natstls import TlsFiles
from lensbus.subjects import (
    DEFAULT_PREFIX,
    FLEET_VERBS,
    Subjects,
    validate_device,
    validate_token,
)

DEFAULT_HUB_DOMAIN = "hub"
# The fleet verbs the read-only ``client`` may call: they change nothing.
FLEET_READ_VERBS = ("fleet_status",)
# nats-server's own default leaf node port.
DEFAULT_LEAF_PORT = 7422


def _quoted(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def hub_jetstream(domain: str = DEFAULT_HUB_DOMAIN) -> str:
    """What the hub's ``jetstream {}`` block adds: its domain."""
    return f"domain: {validate_token(domain, 'JetStream domain')}"


def hub_leafnodes(
    port: int = DEFAULT_LEAF_PORT, host: str = "0.0.0.0", tls: TlsFiles | None = None
) -> str:
    """The hub's ``leafnodes`` block: where devices connect (over TLS with ``tls``: every
    device must then trust its CA, :mod:`lensbus.natsleafauth`)."""
    secured = leaf_tls(tls) if tls else ""
    return f'leafnodes {{\n  listen: "{host}:{port}"\n{secured}}}\n'


def device_jetstream(device: str) -> str:
    """What a device's ``jetstream {}`` block adds: its domain, which is its name."""
    return f"domain: {validate_device(device)}"


def device_leafnodes(
    hub_urls: Iterable[str],
    prefix: str = DEFAULT_PREFIX,
    credentials: str | None = None,
    nkey: str | None = None,
    tls_ca: str | Path | None = None,
) -> str:
    """A device's ``leafnodes`` block: one remote to the hub (``nats-leaf://host:7422``, or
    several URLs of a hub cluster), denying :meth:`Subjects.leaf_denied` both ways; ``nkey``
    (the device's seed, or ``$VAR``) and ``tls_ca`` for a secured hub."""
    urls = list(hub_urls)
    if not urls:
        raise ValueError("hub_urls: give at least one nats-leaf:// URL of the hub")
    denied = _quoted(Subjects(prefix).leaf_denied())
    creds = f'\n      credentials: "{credentials}"' if credentials else ""
    creds += remote_auth(nkey, tls_ca)
    return (
        "leafnodes {\n  remotes: [\n    {\n"
        f"      urls: {_quoted(urls)}{creds}\n"
        f"      deny_imports: {denied}\n"
        f"      deny_exports: {denied}\n"
        "    }\n  ]\n}\n"
    )


def server_config(
    name: str, listen: str, store_dir: str, jetstream: str, leafnodes: str, extra: str = ""
) -> str:
    """A whole nats-server config (what ``deploy/leaf/`` holds)."""
    return (
        f'server_name: "{name}"\nlisten: "{listen}"\nmax_payload: 8MB\n'
        f'jetstream {{\n  store_dir: "{store_dir}"\n  {jetstream}\n}}\n{leafnodes}{extra}'
    )


def fleet_permissions(
    user: str, prefix: str = DEFAULT_PREFIX, hub_domain: str = DEFAULT_HUB_DOMAIN
) -> dict[str, list[str]]:
    """What a fleet adds to a NATS user's publish allow list (``natsauth`` merges it; replies
    come on the user's own inbox, which it already subscribes): the ``deployer`` of a hub
    manages the fleet bucket and the fleet results stream (whose sources name each device's
    API) and asks any device's domain whether it answers; a device's ``deployer`` reads the
    hub's fleet bucket and model store through the hub's domain and keeps its own fleet
    bucket; the ``operator`` calls every fleet verb, the ``client`` the read ones."""
    s = Subjects(prefix)
    if user == "operator":
        return {"publish": [s.deployer_api(verb) for verb in FLEET_VERBS]}
    if user == "client":
        return {"publish": [s.deployer_api(verb) for verb in FLEET_READ_VERBS]}
    if user != "deployer":
        return {"publish": []}
    fleet_kv = kv_stream(s.fleet_bucket)
    hub = [  # a hub's: the fleet bucket and stream, and whether a silent device answers again
        *stream_admin(fleet_kv),
        *stream_admin(s.fleet_results_stream),
        kv_subject(s.fleet_bucket),
        account_info(domain_api(ANY_DOMAIN)),
    ]
    hub_api = domain_api(hub_domain)
    device = [  # a device's: the hub's fleet bucket and models, its own seen report
        *stream_read(fleet_kv, hub_api),
        *stream_read(obj_stream(s.models_bucket), hub_api),
    ]
    return {"publish": list(dict.fromkeys([*hub, *device]))}


# ---- python -m lensbus.natsleaf -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lensbus.natsleaf", description="print a hub's or a device's config"
    )
    sub = parser.add_subparsers(dest="what", required=True)
    hub = sub.add_parser("hub-config", help="the hub's nats-server config")
    hub.add_argument("--domain", default=DEFAULT_HUB_DOMAIN, help="its JetStream domain")
    hub.add_argument("--leaf-port", type=int, default=DEFAULT_LEAF_PORT)
    hub.add_argument("--tls-dir", type=Path, help="TLS on the leaf port: server.pem, ...")
    hub.add_argument(
        "--device", action="append", default=[], help="NAME=PUBLIC_NKEY: a device allowed in"
    )
    dev = sub.add_parser("device-config", help="a device's nats-server config")
    dev.add_argument("device", help="the device's name (its JetStream domain)")
    dev.add_argument(
        "--hub", action="append", required=True, help="nats-leaf://host:7422 (repeatable)"
    )
    dev.add_argument("--credentials", help="a .creds file for the leaf link")
    dev.add_argument("--nkey-file", type=Path, help="the device's seed: written into the config")
    dev.add_argument("--nkey-env", help="VAR: nats-server reads the seed from $VAR instead")
    dev.add_argument("--tls-ca", help="the CA the hub's leaf certificate is signed by")
    for p in (hub, dev):
        p.add_argument("--prefix", default=DEFAULT_PREFIX, help="the installation's prefix")
        p.add_argument("--listen", default="0.0.0.0:4222", help="client listen address")
        p.add_argument("--store-dir", default="/data/jetstream")
    key = sub.add_parser("device-key", help="a new seed for a device; prints NAME=PUBLIC_NKEY")
    key.add_argument("device", help="the device's name")
    key.add_argument("--out", type=Path, required=True, help="the seed file (made 0600)")
    return parser


def _config(args: argparse.Namespace) -> str:
    if args.what == "hub-config":
        devices = dict(parse_device_key(value) for value in args.device)
        tls = TlsFiles.in_folder(args.tls_dir) if args.tls_dir else None
        return server_config(
            args.domain,
            args.listen,
            args.store_dir,
            hub_jetstream(args.domain),
            hub_leafnodes(args.leaf_port, tls=tls),
            hub_authorization(devices, args.prefix),
        )
    validate_device(args.device)
    nkey = f"${args.nkey_env}" if args.nkey_env else None
    if args.nkey_file:
        nkey = args.nkey_file.read_text().strip()
    return server_config(
        args.device,
        args.listen,
        args.store_dir,
        device_jetstream(args.device),
        device_leafnodes(args.hub, args.prefix, args.credentials, nkey, args.tls_ca),
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.what == "device-key":
            print(f"{validate_device(args.device)}={new_device_key(args.out)}")
            return 0
        text = _config(args)
    except (ValueError, OSError) as exc:
        print(f"natsleaf: {exc}", file=sys.stderr)
        return 2
    command = " ".join(
        ["python -m lensbus.natsleaf", *(argv if argv is not None else sys.argv[1:])]
    )
    sys.stdout.write(f"# Generated by: {command}\n# See deploy/leaf/README.md.\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
