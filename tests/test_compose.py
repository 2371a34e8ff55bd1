"""compose.yaml, the Dockerfiles and deploy/ (Prometheus, Grafana) are consistent and valid.

``docker-compose config`` (Debian's docker-compose package) and ``promtool`` (Debian's
prometheus package) check what they can when installed; the rest reads the files. That the
compose set really runs is scripts/compose-smoke.sh's job (podman, minutes).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lensbus.natsauth import USERS, compose_config, env_var

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
SERVICES = ("capture", "inference", "deployer", "publisher")
ONE_SHOT = {"init"}  # runs once and exits: no healthcheck
METRICS_PORTS = {"capture": 9101, "inference": 9102, "deployer": 9103, "publisher": 8080}
REQUIRED = [env_var(u) for u in USERS] + ["LENSBUS_PUBLISHER_TOKEN"]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def dummy_env(tmp_path: Path, **extra: str) -> Path:
    values = {name: f"p{name.lower().replace('_', '')}0000" for name in REQUIRED} | extra
    path = tmp_path / "compose.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


# ---- compose.yaml ---------------------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, svc in services().items():
        if name in ONE_SHOT:
            assert "healthcheck" not in svc and svc.get("restart") == "on-failure", name
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert svc.get("restart") in ("unless-stopped", "always"), name


def test_lensbus_healthchecks_ask_healthz_with_python() -> None:
    """Slim images have no curl: the check is Python's urllib on the service's own port."""
    svcs = services()
    for name in (*SERVICES, "inference-gpu"):
        test = svcs[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python3", "-c"] and "/healthz" in test[3], name


def test_every_referenced_dockerfile_and_mounted_file_exists() -> None:
    for name, svc in services().items():
        if "build" in svc:
            assert dockerfile_of(svc).is_file(), f"{name}: {dockerfile_of(svc)} missing"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_services_start_in_order_of_health() -> None:
    svcs = services()
    for name in (*SERVICES, "inference-gpu"):
        assert svcs[name]["depends_on"]["nats"]["condition"] == "service_healthy", name
    assert svcs["init"]["depends_on"]["deployer"]["condition"] == "service_healthy"


def test_inference_scales() -> None:
    for name in ("inference", "inference-gpu"):
        svc = services()[name]
        assert "container_name" not in svc and "ports" not in svc, name
    gpu = services()["inference-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_each_service_connects_as_its_own_nats_user() -> None:
    svcs = services()
    for name in SERVICES:
        env = svcs[name]["environment"]
        prefix = f"LENSBUS_{name.upper()}_"
        assert env[f"{prefix}NATS_USER"] == name
        assert env[f"{prefix}NATS_PASSWORD"].startswith(f"${{{env_var(name)}:?")
        assert env[f"{prefix}NATS_URL"] == "nats://nats:4222"
    nats = svcs["nats"]
    assert nats["image"].startswith("nats:2.10")  # the official image on a device
    assert set(nats["environment"]) == {env_var(u) for u in USERS}
    assert "./deploy/nats/nats-server.conf:/etc/nats/nats-server.conf:ro" in nats["volumes"]
    assert (ROOT / "deploy/nats/nats-server.conf").read_text() == compose_config()


def test_publisher_binds_all_addresses_behind_its_token() -> None:
    env = services()["publisher"]["environment"]
    assert env["LENSBUS_PUBLISHER_HOST"] == "0.0.0.0"
    assert env["LENSBUS_PUBLISHER_TOKEN"].startswith("${LENSBUS_PUBLISHER_TOKEN:?")


def test_capture_plays_a_shipped_video_by_default() -> None:
    env = services()["capture"]["environment"]
    assert env["LENSBUS_CAPTURE_SOURCE"].endswith(":-/opt/lensbus/media/bikes.mp4}")
    assert env["LENSBUS_CAPTURE_LOOP"] == "true"
    assert "bikes.mp4" in (ROOT / "services/capture/Dockerfile").read_text()


def test_env_example_names_every_required_setting() -> None:
    example = (ROOT / ".env.example").read_text()
    text = COMPOSE.read_text()
    for name in REQUIRED:
        assert re.search(rf"^{name}=$", example, re.M), f".env.example lacks {name}="
        assert f"${{{name}:?" in text, f"compose.yaml does not require {name}"


# ---- docker-compose config (Debian's docker-compose package) ------------------------------

DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)"
)


def compose_config_cmd(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE), "--env-file", str(env_file), *args, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@needs_compose
@pytest.mark.parametrize("profiles", [[], ["gpu"], ["monitoring"]])
def test_docker_compose_config_is_valid(tmp_path: Path, profiles: list[str]) -> None:
    args = [a for p in profiles for a in ("--profile", p)]
    done = compose_config_cmd(dummy_env(tmp_path), *args)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert set(SERVICES) | {"nats", "init"} <= set(config["services"])
    env = config["services"]["capture"]["environment"]
    assert env["LENSBUS_CAPTURE_NATS_PASSWORD"] == "plensbusnatscapturepassword0000"


@needs_compose
def test_docker_compose_refuses_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("# nothing set\n")
    done = compose_config_cmd(empty)
    assert done.returncode != 0
    assert "set it in .env" in done.stderr, done.stderr


# ---- Dockerfiles ----------------------------------------------------------------------------


def dockerfiles() -> dict[str, Path]:
    return {name: ROOT / "services" / name / "Dockerfile" for name in SERVICES}


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_base_is_an_argument_and_user_not_root(name: str) -> None:
    text = dockerfiles()[name].read_text()
    lines = [line.strip() for line in text.splitlines()]
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert any(line.startswith("ARG BASE_IMAGE=") for line in lines[:first_from]), name
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) >= 2 and all("${BASE_IMAGE}" in f for f in froms), "multi-stage, slim"
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{name} runs as root"
    assert "python3 -m venv" in text  # python3: the Debian base has no `python`


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_installs_only_its_own_service(name: str) -> None:
    text = dockerfiles()[name].read_text()
    others = [s for s in SERVICES if s != name]
    for other in others:
        assert f"services/{other}" not in text, f"{name}'s image installs {other}"
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file"


def test_capture_image_carries_no_mxnet() -> None:
    text = dockerfiles()["capture"].read_text().lower()
    assert "mxnet" not in text.replace("no mxnet", "")
    assert "pip install -c constraints.txt ./shared ./services/capture" in text
    capture_deps = (ROOT / "services/capture/pyproject.toml").read_text().lower()
    shared_deps = (ROOT / "shared/pyproject.toml").read_text().lower()
    assert "mxnet" not in re.sub(r"#.*", "", capture_deps + shared_deps)


def test_inference_image_builds_the_demo_model_init_deploys() -> None:
    text = dockerfiles()["inference"].read_text()
    assert "lensbus models build-demo" in text and "yolov3-tiny-onnx" in text
    init = (ROOT / "deploy/init/deploy-demo.sh").read_text()
    assert "/opt/lensbus/models/yolov3-tiny-onnx" in init
    assert services()["init"]["image"] == services()["inference"]["image"]


# ---- Prometheus and Grafana -----------------------------------------------------------------


def prometheus() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())


def test_prometheus_scrapes_every_service_and_every_inference_replica() -> None:
    jobs = {j["job_name"]: j for j in prometheus()["scrape_configs"]}
    for name in ("capture", "deployer", "publisher"):
        assert jobs[name]["static_configs"][0]["targets"] == [f"{name}:{METRICS_PORTS[name]}"]
    sd = jobs["inference"]["dns_sd_configs"]
    assert {tuple(s["names"]) for s in sd} == {("inference",), ("inference-gpu",)}
    assert all(s["type"] == "A" and s["port"] == METRICS_PORTS["inference"] for s in sd)
    assert jobs["publisher"]["authorization"]["credentials_file"] == "/prometheus/publisher.token"
    svcs = services()
    for name in ("capture", "inference", "deployer"):
        port = svcs[name]["environment"][f"LENSBUS_{name.upper()}_METRICS_PORT"]
        assert port.endswith(f":-{METRICS_PORTS[name]}}}"), (name, port)
    assert "/prometheus/publisher.token" in svcs["prometheus"]["command"][0]


def dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy/grafana/dashboards/lensbus.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_uses_only_metrics_the_services_export() -> None:
    defined: set[str] = set()
    for path in [ROOT / "shared/lensbus/metrics.py", *ROOT.glob("services/*/lensbus_*/metrics.py")]:
        defined |= set(re.findall(r'"(lensbus_[a-z0-9_]+)"', path.read_text()))
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for e in dashboard_exprs()
            for m in re.findall(r"lensbus_[a-z0-9_]+", e)}  # fmt: skip
    assert used, "the dashboard queries nothing"
    assert used <= defined, f"not exported by any service: {sorted(used - defined)}"
    titles = " ".join(p["title"].lower() for p in dashboard()["panels"])
    for topic in ("frames per second", "dropped", "stage latency", "end-to-end", "model", "swaps"):
        assert topic in titles, topic


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    grafana = services()["grafana"]
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/lensbus.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]} and source["url"] == "http://prometheus:9090"


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_config_and_every_dashboard_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    token = tmp_path / "publisher.token"
    token.write_text("token")
    config = tmp_path / "prometheus.yml"
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    config.write_text(text.replace("/prometheus/publisher.token", str(token)))
    done = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # Every panel query as a recording rule: promtool parses the PromQL.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"lensbus:dashboard_query_{i}", "expr": e}
        for i, e in enumerate(dashboard_exprs())
    ]}]}  # fmt: skip
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    done = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
