"""deploy/cluster (a 3-node NATS cluster for compose) is generated from the code and stays
in line with the one-server deploy/nats/nats-server.conf and the root compose.yaml."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lensbus.cli.compose_setup import compose_config
from lensbus.natsclusterconf import cluster_compose, cluster_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "deploy" / "cluster"
NODES = (1, 2, 3)
HOSTS = {1: "nats", 2: "nats-2", 3: "nats-3"}  # node 1 is the root compose's own server
REGENERATE = "regenerate with `python -m lensbus.natscluster cluster-config --write deploy/cluster`"


def test_committed_cluster_files_are_generated_from_the_code() -> None:
    for node in NODES:
        committed = (CLUSTER / f"nats-server-{node}.conf").read_text()
        assert committed == cluster_config(node), f"nats-server-{node}.conf differs: {REGENERATE}"
    compose = cluster_compose((ROOT / "compose.yaml").read_text())
    assert (CLUSTER / "compose.yaml").read_text() == compose, f"compose.yaml differs: {REGENERATE}"


def block(text: str, name: str) -> str:
    """The top-level ``name { ... }`` block of a nats-server config."""
    match = re.search(rf"^{name} \{{\n(?:.*\n)*?\}}\n", text, re.MULTILINE)
    assert match, f"no {name} block"
    return match.group(0)


def test_each_node_is_the_single_server_config_plus_its_name_and_routes() -> None:
    single = compose_config()
    names = set()
    for node in NODES:
        text = cluster_config(node)
        names.add(re.search(r'^server_name: "(.*)"$', text, re.MULTILINE).group(1))  # type: ignore[union-attr]
        routes = re.findall(r"nats-route://([a-z0-9-]+):6222", block(text, "cluster"))
        assert sorted(routes) == [HOSTS[n] for n in NODES if n != node]
        for same in ("authorization", "jetstream"):
            assert block(text, same) == block(single, same), same
        assert re.search(r"^max_payload: .*$", text, re.MULTILINE).group(0) in single  # type: ignore[union-attr]
        for other in ("tls", "mqtt"):  # whatever the single server has, every node has
            if re.search(rf"^{other} \{{", single, re.MULTILINE):
                assert block(text, other) == block(single, other), other
        # the routes: mutual TLS with the clients' certificate and the installation's CA
        routes = block(text, "cluster")
        for line in block(single, "tls").splitlines()[1:3]:  # cert_file, key_file
            assert f"  {line}" in routes, routes
        assert 'ca_file: "/etc/nats/tls/ca.pem"' in routes and "verify: true" in routes
    assert names == {"n1", "n2", "n3"}
    with pytest.raises(ValueError, match="node 4"):
        cluster_config(4)


def test_compose_nodes_mirror_the_root_nats_service() -> None:
    root = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["nats"]
    nodes = yaml.safe_load((CLUSTER / "compose.yaml").read_text())["services"]
    assert sorted(nodes) == sorted(HOSTS.values())
    for node, host in HOSTS.items():
        svc = nodes[host]
        assert svc["image"] == root["image"] and svc["environment"] == root["environment"]
        assert svc["healthcheck"] == root["healthcheck"]
        conf = f"./deploy/cluster/nats-server-{node}.conf:/etc/nats/nats-server.conf:ro"
        assert conf in svc["volumes"]
        data = "nats-data:/data" if node == 1 else f"nats-{node}-data:/data"
        assert data in svc["volumes"], svc["volumes"]
        for mount in svc["volumes"]:
            source = mount.rsplit(":", 2)[0] if mount.endswith((":ro", ":rw")) else mount
            if source.startswith("."):  # relative to the repository root, the project dir
                assert (ROOT / source).exists(), mount
        root_targets = [m.rsplit(":", 2)[1] for m in root["volumes"] if m.endswith(":ro")]
        assert root_targets == [m.rsplit(":", 2)[1] for m in svc["volumes"] if m.endswith(":ro")]
    assert nodes["nats"]["ports"] == root["ports"]  # programs connect where they did


DOCKER_COMPOSE = shutil.which("docker-compose")


def docker_compose(tmp_path: Path, *files: Path) -> str:
    """``docker-compose config`` of ``files`` (project directory: the repository root)."""
    text = "".join(f.read_text() for f in files)
    env = tmp_path / "cluster.env"
    required = sorted(set(re.findall(r"\$\{([A-Z0-9_]+):\?", text)))
    values = {n: f"/p{n.lower()}" if n.endswith("_DIR") else f"p{n.lower()}0000" for n in required}
    env.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    assert DOCKER_COMPOSE is not None
    command = [DOCKER_COMPOSE, "--env-file", str(env), "--project-directory", str(ROOT)]
    for f in files:
        command += ["-f", str(f)]
    proc = subprocess.run(
        [*command, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_cluster_alone_and_over_the_root(tmp_path: Path) -> None:
    alone = yaml.safe_load(docker_compose(tmp_path, CLUSTER / "compose.yaml"))
    assert sorted(alone["services"]) == sorted(HOSTS.values())
    merged = yaml.safe_load(
        docker_compose(tmp_path, ROOT / "compose.yaml", CLUSTER / "compose.yaml")
    )
    confs = [v for v in merged["services"]["nats"]["volumes"] if "nats-server.conf" in str(v)]
    assert len(confs) == 1 and "deploy/cluster/nats-server-1.conf" in str(confs[0])
    assert {"nats-2", "nats-3", "deployer"} <= set(merged["services"])
