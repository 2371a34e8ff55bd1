"""A NATS cluster: N nats-servers (``n1``..``nN``) with routes between them, JetStream on
each (its own folder), replicated by NATS itself (a resource at R3 has a copy on three
servers and survives one of them dying).

- :class:`NatsCluster`: a local cluster on loopback ports, for the tests, the benchmarks and
  developers (``python -m lensbus.natscluster --size 3 --dir DIR``): start, stop, kill and
  restart one node (same ports, same JetStream folder), the URL list for ``nats_url``.
  With ``tls`` its clients speak TLS and its routes are mutual TLS.
- ``python -m lensbus.natscluster cluster-config --write deploy/cluster``: the generated
  configs of ``deploy/cluster/compose.yaml`` (:mod:`lensbus.natsclusterconf`).

Readiness is read from each server's monitoring port (``/jsz``: the JetStream meta group's
leader and size; ``/healthz``: JetStream current on that server): a plain HTTP GET that any
caller can make synchronously, and which says how many peers the meta group has, which
``$JS.API.INFO`` does not.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lensbus.natsclusterconf import (
    CLUSTER_NAME,
    cluster_block,
    cluster_config,
    node_name,
    write_configs,
)
from lensbus.natsserver import MAX_PAYLOAD, NatsServer, free_port
from lensbus.natstls import TlsFiles
from lensbus.subjects import DEFAULT_PREFIX

SERVICES = ("capture", "inference", "deployer", "publisher", "analytics", "projects")
POLL_S = 0.1


class NatsCluster:
    """``size`` local nats-servers in one cluster; nodes are numbered 1..size (``n1``..)."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        name: str = CLUSTER_NAME,
        host: str = "127.0.0.1",
        max_payload: int = MAX_PAYLOAD,
        extra_config: str = "",
        tls: TlsFiles | None = None,
    ) -> None:
        """``extra_config``: config text every node gets (``authorization {}``...); ``tls``:
        clients must speak TLS and the routes are mutual TLS, both with these files."""
        if size < 1:
            raise ValueError(f"a cluster needs at least 1 server, not {size}")
        self.base_dir = Path(base_dir)
        self.size = size
        self.host = host
        route_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        routes = [f"nats-route://{host}:{p}" for p in route_ports]
        self.routes = routes  # each node's route URL (where another server would join)
        self.servers: list[NatsServer] = []
        for i in range(size):
            others = [r for j, r in enumerate(routes) if j != i]
            config = (
                f'http: "{host}:{self.http_ports[i]}"\n'
                + cluster_block(name, f"{host}:{route_ports[i]}", others, tls)
                + extra_config
            )
            n = node_name(i + 1)
            log = self.base_dir / f"{n}.log"
            server = NatsServer(self.base_dir / n, host=host, max_payload=max_payload, tls=tls)
            server.server_name, server.extra_config, server.log_file = n, config, log
            self.servers.append(server)

    # ---- addresses --------------------------------------------------------------------------

    def server(self, node: int) -> NatsServer:
        if not 1 <= node <= self.size:
            raise ValueError(f"node {node} is not one of 1..{self.size}")
        return self.servers[node - 1]

    def url(self, node: int) -> str:
        return self.server(node).url

    @property
    def urls(self) -> str:
        """Every node's URL, comma-joined: a service's ``nats_url``."""
        return ",".join(self.url_list)

    @property
    def url_list(self) -> list[str]:
        """Every node's URL (what ``nats.connect(servers=...)`` takes)."""
        return [s.url for s in self.servers]

    def urls_from(self, node: int) -> str:
        """Every URL with ``node``'s first (a client's preferred server)."""
        first = self.url(node)
        return ",".join([first, *(s.url for s in self.servers if s.url != first)])

    def running(self, node: int) -> bool:
        proc = self.server(node).proc
        return proc is not None and proc.poll() is None

    # ---- life -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node; return once JetStream's meta group has a leader that every
        node knows, with all ``size`` peers, and every node's JetStream is current."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            for server in self.servers:
                server.start(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def kill(self, node: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.server(node).kill()

    def restart(self, node: int, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again (same ports, same JetStream folder) and
        wait until it has caught up (its JetStream current)."""
        self.server(node).start(timeout)
        self.wait_ready(timeout, [node])

    def wait_ready(self, timeout: float = 30.0, nodes: Iterable[int] | None = None) -> None:
        """Wait until each of ``nodes`` (default: every running one) knows the meta leader
        and all ``size`` peers, and reports its JetStream healthy."""
        wanted = list(nodes) if nodes is not None else [n for n in self.nodes if self.running(n)]
        deadline = time.monotonic() + timeout
        while True:
            waiting = ", ".join(f"{node_name(n)}: {p}" for n in wanted if (p := self.problem(n)))
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS cluster not ready after {timeout:.0f} s ({waiting})")
            time.sleep(POLL_S)

    @property
    def nodes(self) -> range:
        return range(1, self.size + 1)

    # ---- monitoring -------------------------------------------------------------------------

    def monitor(self, node: int, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``jsz``, ``connz``, ``healthz``...) of one node."""
        url = f"http://{self.host}:{self.http_ports[node - 1]}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                data: dict[str, Any] = json.load(reply)
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON reason
            data = json.loads(exc.read() or b"{}")
            data.setdefault("status", f"HTTP {exc.code}")
        return data

    def problem(self, node: int) -> str | None:
        """Why ``node`` is not ready yet, or ``None``."""
        try:
            meta = self.monitor(node, "jsz").get("meta_cluster") or {}
            health = self.monitor(node, "healthz")
        except (OSError, ValueError) as exc:
            return f"monitoring not answering ({exc})"
        if not meta.get("leader"):
            return "no JetStream meta leader"
        if int(meta.get("cluster_size") or 0) < self.size:
            return f"{meta.get('cluster_size')} of {self.size} peers"
        if health.get("status") != "ok":
            return f"JetStream not current ({health.get('error') or health.get('status')})"
        return None

    def connections(self, node: int) -> list[str]:
        """The names of the clients connected to ``node`` (nats-py's ``name=``: lensbus
        services connect as ``<service>.<instance>``)."""
        conns = self.monitor(node, "connz?limit=1024").get("connections") or []
        return [str(c.get("name") or "") for c in conns]

    def node_of(self, client_name: str) -> int | None:
        """The running node a client of that name is connected to, if any."""
        for node in self.nodes:
            if self.running(node) and client_name in self.connections(node):
                return node
        return None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the command ----------------------------------------------------------------------------


def hint(cluster: NatsCluster) -> str:
    urls, r = cluster.urls, min(cluster.size, 5)
    env = "\n".join(
        f"  export LENSBUS_{s.upper()}_NATS_URL={urls} LENSBUS_{s.upper()}_JETSTREAM_REPLICAS={r}"
        for s in SERVICES
    )
    return (
        f"NATS cluster of {cluster.size} (JetStream replicated) at:\n  {urls}\n"
        f"Point lensbus at it (each service's URL list, replicas = cluster size):\n{env}\n"
        f"  export LENSBUS_NATS_URL={urls}   # the lensbus command\n"
        f"Logs and JetStream folders: {cluster.base_dir}. Ctrl-C stops it."
    )


def run(size: int, folder: Path) -> int:
    cluster = NatsCluster(folder, size)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        print(hint(cluster), flush=True)
        while not stop:
            time.sleep(0.5)
            for node in cluster.nodes:
                if not cluster.running(node):
                    print(f"node {node_name(node)} exited; see {cluster.base_dir}", flush=True)
                    return 1
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lensbus.natscluster",
        description="a local NATS cluster for development (routes, JetStream replicated), "
        "or the configs of deploy/cluster",
    )
    parser.add_argument("--size", type=int, default=3, help="servers in the cluster (3)")
    parser.add_argument("--dir", type=Path, help="JetStream folders and logs (default: temp)")
    sub = parser.add_subparsers(dest="what", metavar="WHAT")
    conf = sub.add_parser("cluster-config", help="nats-server configs of deploy/cluster")
    conf.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix")
    conf.add_argument("--node", type=int, help="print this node's config")
    conf.add_argument(
        "--write", type=Path, metavar="DIR", help="write nats-server-<N>.conf and compose.yaml"
    )
    conf.add_argument(
        "--root-compose", type=Path, default=Path("compose.yaml"), help="(./compose.yaml)"
    )
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error("--size must be at least 1")
    if args.what == "cluster-config":
        if args.write:
            write_configs(args.write, args.root_compose, args.size, args.prefix)
        elif args.node:
            sys.stdout.write(cluster_config(args.node, args.size, args.prefix))
        else:
            parser.error("cluster-config needs --node N or --write DIR")
        return 0
    if args.dir is None:
        import tempfile

        args.dir = Path(tempfile.mkdtemp(prefix="lensbus-cluster-"))
    return run(args.size, args.dir)


if __name__ == "__main__":
    sys.exit(main())
