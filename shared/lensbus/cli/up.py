"""``lensbus up``: the whole system on this machine, in one command.

Starts an embedded nats-server (JetStream in ``.lensbus/``, TLS with a local CA unless
``--no-tls``, each service with its own NATS user, nkey and permissions, each project's
process its own user through the auth callout, MQTT for Home Assistant on ``--mqtt-port``),
then the deployer, inference, analytics (idle until the
group's pipeline tracks), projects (idle until a project is deployed), capture and publisher
as child processes with their normal settings.
When no model is deployed yet it builds the demo packages from the installed PyPI packages
and uploads and activates YOLOv3-tiny through the deployer, as a user would. Children that
die, nats-server included, are restarted with back-off; Ctrl-C or SIGTERM stops them in
order and leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from lensbus.bus import connect
from lensbus.cli.inference_python import (
    PYTHON_ENV,
    InferencePythonError,
    choose_python,
)
from lensbus.cli.up_setup import GROUP, UpKeys, inference_layout, service_settings
from lensbus.codec import DecodeError, decode
from lensbus.deployclient import UNREACHABLE, DeployClient, DeployError
from lensbus.errors import LensbusError
from lensbus.natsmqtt import DEFAULT_MQTT_PORT, MQTT_USER
from lensbus.natsserver import MAX_PAYLOAD, NatsServer, free_port, port_free
from lensbus.natstls import TlsError
from lensbus.processes import ServiceFailed
from lensbus.schemas import Result
from lensbus.subjects import InvalidName, Subjects, validate_camera_id
from lensbus.supervisor import Child, Supervisor

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "opencv", "mxnet", "torch")
# Start order; they stop in the reverse order (frames stop first, the model store last).
SERVICES = ("deployer", "inference", "analytics", "projects", "capture", "publisher")


class UpError(LensbusError):
    """Something that stops ``lensbus up`` from starting, with what to do about it."""


def say(line: str) -> None:
    print(f"lensbus up: {line}", flush=True)


class Up:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = Path(args.data_dir).resolve()
        self.logs = self.data / "logs"
        self.server: NatsServer | None = None
        self.sup = Supervisor()
        self.url = args.nats_url or ""
        self.keys: UpKeys | None = None  # None with --nats-url: no credentials of ours
        self.stopping = False
        # Set when start-up is over: the main loop's supervisor round then watches the server.
        self.started = threading.Event()
        self.start_watch: threading.Thread | None = None
        self.inference_python = sys.executable

    # ---- NATS ------------------------------------------------------------------------------

    def start_nats(self) -> None:
        if self.args.nats_url:
            say(f"using NATS at {self.args.nats_url} (no embedded server)")
            return
        if not port_free(self.args.nats_port):
            raise UpError(
                f"port {self.args.nats_port} is in use (is lensbus up already running?): "
                "pass --nats-port N, or --nats-url to use that server"
            )
        mqtt_port = self.args.mqtt_port or None
        if mqtt_port and not port_free(mqtt_port):
            raise UpError(f"MQTT port {mqtt_port} is in use: pass --mqtt-port N (0: no MQTT)")
        self.data.mkdir(parents=True, exist_ok=True)
        try:
            self.keys = keys = UpKeys.make(self.data, tls=not self.args.no_tls)
        except TlsError as exc:
            raise UpError(f"TLS: {exc} (or pass --no-tls)") from None
        self.server = NatsServer(
            self.data / "nats",
            port=self.args.nats_port,
            max_payload=MAX_PAYLOAD,
            extra_config=keys.server_auth(),
            log_file=self.logs / "nats-server.log",
            mqtt_port=mqtt_port,
            tls=keys.tls,
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sup.watch_server(self.server)
        self.start_watch = threading.Thread(
            target=self.watch_server_at_start, name="nats-watch", daemon=True
        )
        self.start_watch.start()
        self.url = self.server.url
        say(f"nats-server listening on {self.url} (JetStream in {self.data / 'nats'})")
        tls = " and tls/ca.pem" if keys.tls else ""
        say(
            f"NATS users' nkey seeds in {self.data / 'nkeys'}: hand out client.nk{tls} "
            "(read-only: programs, viewers, lensbus watch/status); keep operator.nk for lensbus "
            f"deploy/upload/rollback/cameras add (or --secrets {keys.path})"
        )
        if self.server.mqtt_url:
            say(
                f"MQTT (Home Assistant) on {self.server.mqtt_url} as the user "
                f"'{MQTT_USER}' (its password in {keys.path})"
            )

    def watch_server_at_start(self) -> None:
        """Keep the embedded nats-server running while the services start (a minute or more
        on a first run): one dying then is restarted and said, as later; the services and
        the deploy step reconnect."""
        watch = self.sup.server
        while watch is not None and not (self.started.is_set() or self.stopping):
            for event in watch.tick(time.monotonic()):
                say(event)
            self.started.wait(0.2)

    def end_start_watch(self) -> None:
        self.started.set()
        if self.start_watch is not None:
            self.start_watch.join()
            self.start_watch = None

    def client_options(self, user: str = "client") -> dict[str, Any]:
        """Connection options of a program: ``client`` reads, ``operator`` deploys."""
        return self.keys.options(user) if self.keys else {}

    # ---- services ---------------------------------------------------------------------------

    def settings(self, name: str) -> dict[str, str]:
        common = {
            "nats_url": self.url,
            "metrics_port": str(free_port()),
            "instance": f"up-{name}",
            **(self.keys.settings(name) if self.keys else {}),
        }
        secrets = self.keys.secrets if self.keys else {}
        return service_settings(name, self.args, self.data, common, secrets)

    def start_service(self, name: str) -> Child:
        return self.sup.add(Child(name, self.settings(name), self.logs / f"{name}.log"))

    def start_inference(self) -> list[Child]:
        """The inference instances (``--inference-instances``), in one queue group."""
        children = []
        layout = inference_layout(self.args.inference_instances, self.args.device)
        for i, own in enumerate(layout):
            tag = "inference" if i == 0 else f"inference-{i + 1}"
            settings = {**self.settings("inference"), "instance": f"up-{tag}", **own}
            child = Child("inference", settings, self.logs / f"{tag}.log", self.inference_python)
            children.append(self.sup.add(child))
        return children

    def wait_healthy(self, child: Child, timeout: float) -> None:
        try:
            # Short looks: a signal sets self.stopping, which ends the wait.
            if child.wait_healthy(timeout, 0.2, abandon=lambda: self.stopping):
                say(f"{child.name} healthy (/metrics and /healthz on :{child.port})")
        except ServiceFailed as exc:
            if exc.returncode is None:
                raise UpError(
                    f"{child.name} not healthy after {timeout:.0f} s; see {child.log_path}"
                ) from None
            raise UpError(
                f"{child.name} exited at start (code {exc.returncode}); "
                f"its log {child.log_path} ends with:\n{child.log_tail(8)}"
            ) from None

    # ---- model -----------------------------------------------------------------------------

    def build_demo(self) -> Path:
        out = self.data / "models"
        say(f"building the demo models in {out} (first run only)")
        # The Python that runs the model builds it: MXNet's package needs MXNet to export.
        cmd = [self.inference_python, "-m", "lensbus.cli.main", "models", "build-demo"]
        cmd += ["--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        package = out / f"yolov3-tiny-{self.args.backend or 'onnx'}"
        if not package.is_dir():
            raise UpError(
                f"could not build the demo model: {done.stderr.strip() or done.stdout.strip()}"
            )
        return package

    async def ensure_model(self, wait_s: float = 90.0) -> None:
        """Deploy the demo (or ``--model``) unless the group runs it; NATS unreachable (its
        server restarting) is tried again until ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return await self.deploy()
            except DeployError as exc:
                if exc.code != UNREACHABLE or self.stopping or time.monotonic() > deadline:
                    raise UpError(f"deploying the model failed: {exc.message}") from None
                say(f"deploying: {exc.message}; trying again")
                await asyncio.sleep(1.0)

    async def deploy(self) -> None:
        a = self.args
        client = await DeployClient.connect(
            self.url, timeout_s=60, **self.client_options("operator")
        )
        try:
            groups = await client.status(GROUP)
            current = groups[0].deployment if groups else None
            explicit = a.model is not None or a.backend is not None
            if current is not None and not explicit:
                say(f"group {GROUP!r} runs {current.model.ref} (deployed before)")
                return
            package = Path(a.model) if a.model else await asyncio.to_thread(self.build_demo)
            reply = await client.upload(package)
            assert reply.model is not None
            ref = f"{reply.model.name}:{reply.model.version}"
            if current is not None and current.model.ref == ref:
                say(f"group {GROUP!r} runs {ref}")
                return
            await client.activate(GROUP, reply.model.name, reply.model.version)
            say(f"deployed {ref} ({reply.model.framework}) to group {GROUP!r}")
        finally:
            await client.close()

    async def first_result(self, wait_s: float) -> Result | None:
        nc = await connect(self.url, name="lensbus-up", **self.client_options())
        got: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        async def on_result(msg: Any) -> None:
            with contextlib.suppress(DecodeError):
                if not got.done():
                    got.set_result(decode(msg.data, Result))

        await nc.subscribe(Subjects().results(self.args.camera_id), cb=on_result)
        deadline = time.monotonic() + wait_s
        try:
            # Short waits: a signal sets self.stopping, which this loop must notice.
            while not got.done() and not self.stopping and time.monotonic() < deadline:
                await asyncio.wait({got}, timeout=0.2)
            return got.result() if got.done() else None
        finally:
            await nc.close()

    # ---- run -------------------------------------------------------------------------------

    def run(self) -> int:
        t0 = time.monotonic()
        try:
            if not port_free(self.args.port):
                raise UpError(f"port {self.args.port} is in use: pass --port N for the web page")
            self.pick_inference_python()
            self.start_nats()
            self.wait_healthy(self.start_service("deployer"), 60)
            asyncio.run(self.ensure_model())
            for name in SERVICES[1:]:
                started = (
                    self.start_inference() if name == "inference" else [self.start_service(name)]
                )
                for child in started:
                    self.wait_healthy(child, 120)
            result = asyncio.run(self.first_result(120))
            self.end_start_watch()
        except UpError as exc:
            say(f"error: {exc}")
            self.stop()
            return 1
        if self.stopping:
            self.stop()
            return 0
        page = f"http://127.0.0.1:{self.args.port}/"
        if result is None:
            say(f"no result yet after 120 s; see the logs in {self.logs}")
        else:
            seen = ", ".join(f"{d.label} {d.score:.2f}" for d in result.detections[:5]) or "-"
            say(f"first result after {time.monotonic() - t0:.1f} s ({result.model.name}: {seen})")
        say(f"open {page}  (Ctrl-C stops everything)")
        say(self.cameras_hint())
        while not self.stopping:
            for event in self.sup.tick():
                say(event)
            time.sleep(0.5)
        self.stop()
        return 0

    def pick_inference_python(self) -> None:
        try:
            self.inference_python = choose_python(self.args, os.environ.get(PYTHON_ENV))
        except InferencePythonError as exc:
            raise UpError(str(exc)) from None
        if self.inference_python != sys.executable:
            say(f"inference runs from {self.inference_python}")

    def cameras_hint(self) -> str:
        """How to add a camera to the running set (as the operator user)."""
        if self.keys:
            return (
                f"more cameras, live: lensbus cameras add ID SOURCE --nats-url {self.url} "
                f"--secrets {self.keys.path}"
            )
        return f"more cameras, live: lensbus cameras add ID SOURCE --nats-url {self.url}"

    def stop(self) -> None:
        self.stopping = True
        self.end_start_watch()
        self.sup.stop_all()
        if self.server is not None:
            self.server.stop()
            self.server = None
        say("stopped")

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            say(f"{signal.Signals(signum).name} received; stopping")
        self.stopping = True


def _camera(value: str) -> str:
    try:
        return validate_camera_id(value)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    up = Up(args)
    signal.signal(signal.SIGINT, up.on_signal)
    signal.signal(signal.SIGTERM, up.on_signal)
    return up.run()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run NATS and every service on this machine, with a demo model")
    p.add_argument(
        "--source",
        help="camera index, /dev/videoN, video file, folder or URL "
        "(default: a sample video, looping)",
    )
    p.add_argument("--camera-id", type=_camera, default="cam1", help="camera id (default cam1)")
    p.add_argument("--port", type=int, default=8080, help="web page port (default 8080)")
    p.add_argument("--model", help="a model package (folder or .tar.gz) to deploy instead")
    p.add_argument("--backend", choices=BACKENDS, help="demo model framework (default onnx)")
    p.add_argument(
        "--inference-python",
        help=f"the Python that runs inference (default ${PYTHON_ENV}, else this one): one "
        "with lensbus-inference[mxnet] for --backend mxnet on a newer Python",
    )
    p.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N (default cpu)")
    p.add_argument(
        "--inference-instances",
        type=_positive,
        help="inference processes sharing the frames (default on CPU: 2, each on half the "
        "cores with as many threads; on GPU: 1)",
    )
    p.add_argument("--fps", type=float, default=15.0, help="capture rate cap (default 15)")
    p.add_argument("--width", type=int, help="capture output width (keeps aspect ratio)")
    p.add_argument("--nats-url", help="use this NATS server instead of starting one")
    p.add_argument("--nats-port", type=int, default=4222, help="embedded server port")
    p.add_argument(
        "--no-tls",
        action="store_true",
        help="the embedded server without TLS (default: TLS with a local CA in DATA_DIR/tls)",
    )
    p.add_argument(
        "--mqtt-port",
        type=int,
        default=DEFAULT_MQTT_PORT,
        help=f"the embedded server's MQTT port (default {DEFAULT_MQTT_PORT}; 0: no MQTT)",
    )
    p.add_argument("--data-dir", default=".lensbus", help="state folder (default .lensbus)")
    p.set_defaults(func=_up)
