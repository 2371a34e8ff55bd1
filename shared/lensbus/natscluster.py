"""A NATS cluster: N nats-servers (``n1``..``nN``) with routes between them, JetStream on
each (its own folder), replicated by NATS itself (a resource at R3 has a copy on three
servers and survives one of them dying).

- :class:`NatsCluster`: a local cluster on loopback ports, for the tests, the benchmarks and
  developers (``python -m lensbus.natscluster --size 3 --dir DIR``): start, stop, kill and
  restart one node (same ports, same JetStream folder), the URL list for ``nats_url``.
- :func:`cluster_config`: the config of one node of ``deploy/cluster/compose.yaml``
  (``python -m lensbus.natscluster cluster-config --write deploy/cluster``): the one-server
  ``deploy/nats/nats-server.conf`` (its TLS, users and permissions: :mod:`lensbus.natsauth`)
  with the node's name and its routes.

Readiness is read from each server's monitoring port (``/jsz``: the JetStream meta group's
leader and size; ``/healthz``: JetStream current on that server): a plain HTTP GET that any
caller can make synchronously, and which says how many peers the meta group has, which
``$JS.API.INFO`` does not.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lensbus.natsserver import MAX_PAYLOAD, NatsServer, free_port
from lensbus.subjects import DEFAULT_PREFIX

CLUSTER_NAME = "lensbus"
SERVICES = ("capture", "inference", "deployer", "publisher", "analytics", "projects")
POLL_S = 0.1


def node_name(node: int) -> str:
    return f"n{node}"


def cluster_block(name: str, listen: str, routes: Iterable[str]) -> str:
    """nats-server config text of one node's ``cluster {}``: its route listener and the
    routes to the others (a node may list itself; nats-server skips it)."""
    listed = ", ".join(json.dumps(r) for r in routes)
    return f'cluster {{\n  name: "{name}"\n  listen: "{listen}"\n  routes: [{listed}]\n}}\n'


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
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least 1 server, not {size}")
        self.base_dir = Path(base_dir)
        self.size = size
        self.host = host
        route_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        routes = [f"nats-route://{host}:{p}" for p in route_ports]
        self.servers: list[NatsServer] = []
        for i in range(size):
            others = [r for j, r in enumerate(routes) if j != i]
            config = (
                f'http: "{host}:{self.http_ports[i]}"\n'
                + cluster_block(name, f"{host}:{route_ports[i]}", others)
                + extra_config
            )
            n = node_name(i + 1)
            log = self.base_dir / f"{n}.log"
            server = NatsServer(self.base_dir / n, host=host, max_payload=max_payload)
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


# ---- deploy/cluster (compose) -------------------------------------------------------------

COMPOSE_SIZE = 3
CLUSTER_HEADER = """\
# nats-server config of node {node} of deploy/cluster/compose.yaml (a {size}-node cluster,
# JetStream replicated: services set LENSBUS_<SERVICE>_JETSTREAM_REPLICAS=3).
# GENERATED by `python -m lensbus.natscluster cluster-config --write deploy/cluster` from
# the one-server config of deploy/nats/nats-server.conf (lensbus/cli/compose_setup.py,
# lensbus/natsauth.py: the same TLS, users, keys and permissions) and
# shared/lensbus/natscluster.py (the server name and the routes): edit those, not this
# (tests/test_cluster_config.py fails when they differ).
"""
JETSTREAM_BLOCK = re.compile(r"^jetstream \{\n(?:.*\n)*?\}\n", re.MULTILINE)
SERVER_NAME = re.compile(r'^server_name: ".*"$', re.MULTILINE)


def compose_host(node: int) -> str:
    """A node's service name: node 1 is ``nats``, the root compose's own server (services
    reach it by that name, a single server's volume becomes its), then ``nats-2``..."""
    return "nats" if node == 1 else f"nats-{node}"


def cluster_config(
    node: int,
    size: int = COMPOSE_SIZE,
    prefix: str = DEFAULT_PREFIX,
    groups: Iterable[str] = (),
) -> str:
    """The whole ``deploy/cluster/nats-server-<node>.conf``: the one-server compose config
    (whatever it holds: TLS, users, MQTT) with this node's name and the routes to the
    others, so the cluster never drifts from it."""
    from lensbus.cli.compose_setup import compose_config

    if not 1 <= node <= size:
        raise ValueError(f"node {node} is not one of 1..{size}")
    single = compose_config(prefix, groups)
    body = single[single.index("\nserver_name:") + 1 :]  # without its header
    routes = [f"nats-route://{compose_host(n)}:6222" for n in range(1, size + 1) if n != node]
    cluster = (
        "# routes between the nodes, on the compose network only (port 6222 is not published)\n"
        + cluster_block(CLUSTER_NAME, "0.0.0.0:6222", routes)
    )
    body, named = SERVER_NAME.subn(f'server_name: "{node_name(node)}"', body, count=1)
    body, routed = JETSTREAM_BLOCK.subn(lambda m: m.group(0) + cluster, body, count=1)
    if named != 1 or routed != 1:
        raise RuntimeError(
            "the one-server compose config has no server_name or jetstream block any more: "
            "update lensbus.natscluster.cluster_config"
        )
    return f"{CLUSTER_HEADER.format(node=node, size=size)}\n{body}"


COMPOSE_HEADER = """\
# A {size}-node NATS cluster (JetStream replicated) for lensbus: deploy/cluster/README.md.
#   docker compose -f compose.yaml -f deploy/cluster/compose.yaml up -d   # lensbus on it
#   docker compose --project-directory . -f deploy/cluster/compose.yaml up -d  # NATS alone
# Paths are relative to the repository root (the project directory in both commands).
# GENERATED by `python -m lensbus.natscluster cluster-config --write deploy/cluster` from
# the root compose.yaml's `nats` service (the same image, environment and mounts; a config,
# a volume and a service name per node): edit those, not this.
"""
CONF_IN_CONTAINER = "/etc/nats/nats-server.conf"


def _node_volume(mount: str, node: int, data: str) -> str:
    """One of the root ``nats`` service's mounts, for node ``node``; ``data``: the root's
    named volume, node 1's too (a single server's data becomes its). The source may hold
    colons (``${VAR:?message}``): the target is what follows the last ``:/``."""
    src, _, target = mount.rpartition(":/")
    if f"/{target}".split(":")[0] == CONF_IN_CONTAINER:
        src = f"./deploy/cluster/nats-server-{node}.conf"
    elif src == data and node > 1:
        src = f"nats-{node}-data"
    return f"{src}:/{target}"


def cluster_compose(root_compose: str, size: int = COMPOSE_SIZE) -> str:
    """``deploy/cluster/compose.yaml`` from the root compose.yaml's text."""
    import yaml

    nats = yaml.safe_load(root_compose)["services"]["nats"]
    sources = [m.rpartition(":/")[0] for m in nats.get("volumes", [])]
    named = [src for src in sources if "/" not in src and "$" not in src]
    data = named[0] if named else "nats-data"
    services: dict[str, Any] = {}
    for node in range(1, size + 1):
        # a copy per node: shared objects would come out as YAML anchors and aliases
        svc = json.loads(json.dumps({k: v for k, v in nats.items() if k != "ports"}))
        svc["volumes"] = [_node_volume(m, node, data) for m in nats.get("volumes", [])]
        # node 1 is published as the root's nats is; the others on the next host ports
        port = f"${{LENSBUS_NATS_{node}_HOST_PORT:-{4221 + node}}}:4222"
        svc["ports"] = nats.get("ports", []) if node == 1 else [port]
        services[compose_host(node)] = svc
    volumes: dict[str, Any] = {data: {}, **{f"nats-{n}-data": {} for n in range(2, size + 1)}}
    text = yaml.safe_dump({"services": services, "volumes": volumes}, sort_keys=False, width=100)
    return COMPOSE_HEADER.format(size=size) + "\n" + text


def write_configs(folder: Path, root_compose: Path, size: int, prefix: str) -> None:
    if not root_compose.is_file():
        raise SystemExit(f"cluster-config: {root_compose} not found (give --root-compose)")
    for node in range(1, size + 1):
        (folder / f"nats-server-{node}.conf").write_text(cluster_config(node, size, prefix))
    (folder / "compose.yaml").write_text(cluster_compose(root_compose.read_text(), size))


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
