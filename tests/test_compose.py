"""compose.yaml, the Dockerfile and deploy/ (Prometheus, Grafana) are consistent and valid.

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

from lensbus.cli.compose_setup import (
    ENV_SEEDED,
    SECRETS_DIR_ENV,
    compose_config,
    seed_env_var,
)
from lensbus.natsauth import env_var, nkey_env_var, nkey_users
from lensbus.natsmqtt import MQTT_USER
from lensbus.natsprojects import CALLOUT_ISSUER_ENV, CALLOUT_SEED_ENV

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = ("capture", "inference", "deployer", "analytics", "projects", "publisher")
# Inference images besides the default one: GPU, and one per framework set (profiles).
INFERENCE_VARIANTS = ("inference-gpu", "inference-mxnet", "inference-torch")
ONE_SHOT = {"init"}  # runs once and exits: no healthcheck
METRICS_PORTS = {
    "capture": 9101,
    "inference": 9102,
    "deployer": 9103,
    "analytics": 9104,
    "projects": 9105,
    "publisher": 8080,
}
HEALTHZ_PORT_VARS = {
    "capture": "LENSBUS_CAPTURE_METRICS_PORT",
    "inference": "LENSBUS_INFERENCE_METRICS_PORT",
    **{v: "LENSBUS_INFERENCE_METRICS_PORT" for v in INFERENCE_VARIANTS},
    "deployer": "LENSBUS_DEPLOYER_METRICS_PORT",
    "analytics": "LENSBUS_ANALYTICS_METRICS_PORT",
    "projects": "LENSBUS_PROJECTS_METRICS_PORT",
    "publisher": "LENSBUS_PUBLISHER_PORT",
}
# Every user's public nkey, the seeds kept in .env, MQTT's password, the auth callout's
# issuer (nats-server) and its seed (the projects service), the token, the secrets folder.
REQUIRED = [
    SECRETS_DIR_ENV,
    *(nkey_env_var(u) for u in nkey_users()),
    *(seed_env_var(u) for u in ENV_SEEDED),
    env_var(MQTT_USER),
    "LENSBUS_PUBLISHER_TOKEN",
    CALLOUT_ISSUER_ENV,
    CALLOUT_SEED_ENV,
]
# Where a service finds its credentials in its container.
SEED_FILE = "/etc/lensbus/nats/nats.nk"
CA_FILE = "/etc/lensbus/nats/ca.pem"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def dummy_env(tmp_path: Path, **extra: str) -> Path:
    values = {name: f"p{name.lower().replace('_', '')}0000" for name in REQUIRED}
    values |= {SECRETS_DIR_ENV: str(tmp_path / "secrets-dir")} | extra
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
    for name in (*SERVICES, *INFERENCE_VARIANTS):
        test = svcs[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python3", "-c"] and "/healthz" in test[3], name


def mapping_value(node: yaml.Node, key: str) -> yaml.Node | None:
    """The value of `key` in a composed mapping, looking through `<<` merges like YAML does."""
    assert isinstance(node, yaml.MappingNode)
    merged: list[yaml.Node] = []
    for k, v in node.value:
        if k.value == key:
            return v
        if k.value == "<<":
            merged.extend(v.value if isinstance(v, yaml.SequenceNode) else [v])
    return next((found for m in merged if (found := mapping_value(m, key)) is not None), None)


def test_healthchecks_share_one_anchor() -> None:
    """Interval, timeout, retries and start period are written once (x-healthcheck), and the
    lensbus services share one /healthz script (x-healthz), each naming its port's variable."""
    root = yaml.compose(COMPOSE.read_text())
    anchor = mapping_value(root, "x-healthcheck")
    script = mapping_value(root, "x-healthz")
    services_node = mapping_value(root, "services")
    assert anchor is not None and script is not None and services_node is not None
    svcs = services()
    for key, _ in services_node.value:
        name = key.value
        check = mapping_value(services_node, name)
        assert check is not None
        healthcheck = mapping_value(check, "healthcheck")
        if name in ONE_SHOT:
            assert healthcheck is None, name
            continue
        assert healthcheck is not None, name
        assert mapping_value(healthcheck, "interval") is mapping_value(anchor, "interval"), name
        if name in HEALTHZ_PORT_VARS:
            test = mapping_value(healthcheck, "test")
            assert isinstance(test, yaml.SequenceNode) and test.value[3] is script, name
            assert svcs[name]["healthcheck"]["test"][4] == HEALTHZ_PORT_VARS[name], name
            assert HEALTHZ_PORT_VARS[name] in svcs[name]["environment"], name


def test_images_built_here_are_never_pulled() -> None:
    """A registry may hold an image of the same name: compose builds ours, never pulls them."""
    svcs = services()
    built = {svc["image"] for svc in svcs.values() if "build" in svc}
    assert len(built) == len(SERVICES) + len(INFERENCE_VARIANTS)  # and inference's variants
    for name, svc in svcs.items():
        if "build" in svc:
            assert svc["pull_policy"] == "build", name
        elif svc["image"] in built:
            assert svc["pull_policy"] == "never", name  # init runs the inference image


def test_one_dockerfile_with_a_target_per_service() -> None:
    assert not list(ROOT.glob("services/*/Dockerfile")), "the images build from ./Dockerfile"
    svcs = services()
    stages = dockerfile_stages()
    for name in (*SERVICES, *INFERENCE_VARIANTS):
        build = svcs[name]["build"]
        target = "inference" if name in INFERENCE_VARIANTS else name
        assert (build["context"], build["dockerfile"], build["target"]) == (
            ".",
            "Dockerfile",
            target,
        )
        assert target in stages, f"no stage {target} in the Dockerfile"
        assert build["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.11-slim-bookworm}", name
    assert svcs["inference-gpu"]["build"]["args"]["ONNXRUNTIME"].startswith("onnxruntime-gpu")
    assert "ARG ONNXRUNTIME=onnxruntime" in image_text("inference")


def test_an_inference_image_per_framework_set() -> None:
    """The default image has no MXNet and no PyTorch (newest numpy); each framework set is an
    image of its own, built from the same stage with the inference extras it names."""
    svcs = services()
    assert "INFERENCE_EXTRAS" not in svcs["inference"]["build"].get("args", {})
    for extra in ("mxnet", "torch"):
        svc = svcs[f"inference-{extra}"]
        assert svc["build"]["args"]["INFERENCE_EXTRAS"] == extra
        assert svc["profiles"] == [extra]
        assert svc["environment"]["LENSBUS_INFERENCE_GROUP"] == "${LENSBUS_GROUP:-default}"
        # empty: every core (an empty value is "unset" to InferenceSettings)
        assert svc["environment"]["LENSBUS_INFERENCE_THREADS"] == "${LENSBUS_INFERENCE_THREADS:-}"
    text = image_text("inference")
    assert 'ARG INFERENCE_EXTRAS=""' in text
    assert '"./services/inference${INFERENCE_EXTRAS:+[$INFERENCE_EXTRAS]}"' in text
    # numpy<1.24 only where MXNet is: the constraints follow the extras.
    assert "*mxnet*) constraints=" in text and "constraints-mxnet.txt" in text
    pyproject = (ROOT / "services/inference/pyproject.toml").read_text()
    assert re.search(r'^mxnet = \[.*"mxnet==1\.9\.1"', pyproject, re.M)
    assert re.search(r'^torch = \["torch==2\.13\.0"\]', pyproject, re.M)


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
    for name in (*SERVICES, *INFERENCE_VARIANTS):
        assert svcs[name]["depends_on"]["nats"]["condition"] == "service_healthy", name
    assert svcs["init"]["depends_on"]["deployer"]["condition"] == "service_healthy"


def test_inference_scales() -> None:
    for name in ("inference", *INFERENCE_VARIANTS):
        svc = services()[name]
        assert "container_name" not in svc and "ports" not in svc, name
    gpu = services()["inference-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_each_service_connects_as_its_own_nats_user() -> None:
    """Over TLS, with its own nkey: a seed file mounted for it alone (the deployer's and the
    projects service's from .env), the CA; the server gets public keys only."""
    svcs = services()
    for name in SERVICES:
        env = svcs[name]["environment"]
        prefix = f"LENSBUS_{name.upper()}_"
        assert env[f"{prefix}NATS_USER"] == name
        # One server unless .env names a cluster's (deploy/cluster/README.md).
        assert env[f"{prefix}NATS_URL"] == "${LENSBUS_NATS_SERVERS:-tls://nats:4222}"
        assert env[f"{prefix}JETSTREAM_REPLICAS"] == "${LENSBUS_JETSTREAM_REPLICAS:-}"
        assert env[f"{prefix}NATS_TLS_CA"] == CA_FILE
        assert not any(k.endswith("PASSWORD") for k in env), name
        mounts = svcs[name]["volumes"]
        assert any(m.endswith(f"/tls/ca.pem:{CA_FILE}:ro") for m in mounts), name
        seeds = [m for m in mounts if "/nkeys/" in m]
        if name in ENV_SEEDED:
            assert env[f"{prefix}NATS_NKEY_SEED"].startswith(f"${{{seed_env_var(name)}:?"), name
            assert seeds == [] and f"{prefix}NATS_NKEY_FILE" not in env, name
        else:
            assert env[f"{prefix}NATS_NKEY_FILE"] == SEED_FILE
            assert seeds == [
                f"${{{SECRETS_DIR_ENV}:?set it in .env (see .env.example)}}"
                f"/nkeys/{name}.nk:{SEED_FILE}:ro"
            ], name
    nats = svcs["nats"]
    assert nats["image"].startswith("nats:2.10")  # the official image on a device
    public = {nkey_env_var(u) for u in nkey_users()}
    assert set(nats["environment"]) == public | {env_var(MQTT_USER), CALLOUT_ISSUER_ENV}
    assert svcs["projects"]["environment"][CALLOUT_SEED_ENV].startswith(f"${{{CALLOUT_SEED_ENV}:?")
    assert "./deploy/nats/nats-server.conf:/etc/nats/nats-server.conf:ro" in nats["volumes"]
    assert not any("/nkeys/" in m for m in nats["volumes"])  # no seed for the server
    assert (ROOT / "deploy/nats/nats-server.conf").read_text() == compose_config()
    init = svcs["init"]
    assert init["environment"]["LENSBUS_NATS_USER"] == "operator"
    assert any(m.endswith(f"/nkeys/operator.nk:{SEED_FILE}:ro") for m in init["volumes"])


def test_publisher_binds_all_addresses_behind_its_token() -> None:
    env = services()["publisher"]["environment"]
    assert env["LENSBUS_PUBLISHER_HOST"] == "0.0.0.0"
    assert env["LENSBUS_PUBLISHER_TOKEN"].startswith("${LENSBUS_PUBLISHER_TOKEN:?")


def test_capture_plays_a_shipped_video_by_default() -> None:
    env = services()["capture"]["environment"]
    assert env["LENSBUS_CAPTURE_SOURCE"].endswith(":-/opt/lensbus/media/bikes.mp4}")
    assert env["LENSBUS_CAPTURE_LOOP"] == "true"
    assert "bikes.mp4" in image_text("capture")


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
@pytest.mark.parametrize("profiles", [[], ["gpu"], ["mxnet", "torch"], ["monitoring"]])
def test_docker_compose_config_is_valid(tmp_path: Path, profiles: list[str]) -> None:
    args = [a for p in profiles for a in ("--profile", p)]
    done = compose_config_cmd(dummy_env(tmp_path), *args)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert set(SERVICES) | {"nats", "init"} <= set(config["services"])
    env = config["services"]["capture"]["environment"]
    assert env["LENSBUS_CAPTURE_NATS_NKEY_FILE"] == SEED_FILE
    mounted = json.dumps(config["services"]["capture"]["volumes"])
    assert "/secrets-dir/nkeys/capture.nk" in mounted and "/secrets-dir/tls/ca.pem" in mounted
    # What compose makes of the anchors and merges.
    for name, svc in config["services"].items():
        if "build" in svc:
            assert svc["pull_policy"] == "build", name
            target = "inference" if name in INFERENCE_VARIANTS else name
            assert svc["build"]["target"] == target, name
            assert Path(svc["build"]["dockerfile"]).name == "Dockerfile", name
        if name not in ONE_SHOT:
            check = svc["healthcheck"]
            assert (check["interval"], check["timeout"], check["retries"]) == ("10s", "5s", 3), name
    assert config["services"]["init"]["pull_policy"] == "never"
    if "gpu" in profiles:
        gpu = config["services"]["inference-gpu"]
        assert gpu["environment"]["LENSBUS_INFERENCE_DEVICE"] == "gpu"
        assert gpu["healthcheck"]["test"] == config["services"]["inference"]["healthcheck"]["test"]
    for extra in {"mxnet", "torch"} & set(profiles):
        built = config["services"][f"inference-{extra}"]["build"]
        assert built["args"]["INFERENCE_EXTRAS"] == extra, built


@needs_compose
def test_docker_compose_refuses_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("# nothing set\n")
    done = compose_config_cmd(empty)
    assert done.returncode != 0
    assert "set it in .env" in done.stderr, done.stderr


# ---- Dockerfiles ----------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (what it is FROM, its instructions; comments left out)."""
    stages: dict[str, tuple[str, list[str]]] = {}
    lines: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            name = words[3] if len(words) == 4 and words[2].upper() == "AS" else str(len(stages))
            lines = [line]
            stages[name] = (words[1], lines)
        elif stages and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
    return stages


def stages_of(target: str) -> list[str]:
    """The stages an image is built from: its own, what it is FROM, what it copies --from."""
    stages = dockerfile_stages()
    needed: list[str] = []
    todo = [target]
    while todo:
        name = todo.pop()
        if name in needed or name not in stages:
            continue
        needed.append(name)
        base, lines = stages[name]
        todo.append(base)
        todo += re.findall(r"--from=(\S+)", "\n".join(lines))
    return needed


def image_text(target: str) -> str:
    """The Dockerfile's instructions that make the image of `target`."""
    stages = dockerfile_stages()
    return "\n".join(line for name in stages_of(target) for line in stages[name][1])


def test_dockerfile_shares_the_dependency_stage() -> None:
    """The shared package's dependencies are one stage every image builds on; in each image
    the dependencies are installed from the metadata alone before the code is copied."""
    stages = dockerfile_stages()
    for name in SERVICES:
        assert "deps" in stages_of(name), name
        build = stages[f"{name}-build"][1]
        # inference's constraints follow its extras (a shell variable that starts with them)
        deps = next(
            i
            for i, line in enumerate(build)
            if re.search(r"pip install (-c constraints|\$c)", line)
        )
        code = next(i for i, line in enumerate(build) if line.startswith("COPY shared/lensbus "))
        assert deps < code, f"{name}: the code is copied before the dependencies are installed"
    shared = "\n".join(stages["deps"][1])
    assert "pip install -c constraints.txt ./shared" in shared
    assert "services/" not in shared


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_base_is_an_argument_and_user_not_root(name: str) -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert any(line.startswith("ARG BASE_IMAGE=") for line in lines[:first_from]), name
    stages = dockerfile_stages()
    bases = {stages[stage][0] for stage in stages_of(name)}
    assert bases <= {"${BASE_IMAGE}", *stages}, bases
    assert stages[name][0] in stages, "multi-stage, slim"
    final = stages[name][1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{name} runs as root"
    text = image_text(name)
    assert "useradd --uid 10001" in text
    assert "python3 -m venv" in text  # python3: the Debian base has no `python`


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_installs_only_its_own_service(name: str) -> None:
    text = image_text(name)
    others = [s for s in SERVICES if s != name]
    for other in others:
        assert f"services/{other}" not in text, f"{name}'s image installs {other}"
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file"


def test_capture_image_carries_no_mxnet() -> None:
    text = image_text("capture").lower()
    assert "mxnet" not in text.replace("no mxnet", "")
    assert "pip install -c constraints.txt ./shared ./services/capture" in text
    capture_deps = (ROOT / "services/capture/pyproject.toml").read_text().lower()
    shared_deps = (ROOT / "shared/pyproject.toml").read_text().lower()
    assert "mxnet" not in re.sub(r"#.*", "", capture_deps + shared_deps)


def test_inference_image_builds_the_demo_model_init_deploys() -> None:
    text = image_text("inference")
    assert "lensbus models build-demo" in text and "yolov3-tiny-onnx" in text
    init = (ROOT / "deploy/init/deploy-demo.sh").read_text()
    assert "/opt/lensbus/models/yolov3-tiny-onnx" in init
    assert services()["init"]["image"] == services()["inference"]["image"]


# ---- Prometheus and Grafana -----------------------------------------------------------------


def prometheus() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())


def test_prometheus_scrapes_every_service_and_every_inference_replica() -> None:
    jobs = {j["job_name"]: j for j in prometheus()["scrape_configs"]}
    for name in ("capture", "deployer", "analytics", "projects", "publisher"):
        assert jobs[name]["static_configs"][0]["targets"] == [f"{name}:{METRICS_PORTS[name]}"]
    sd = jobs["inference"]["dns_sd_configs"]
    assert {tuple(s["names"]) for s in sd} == {("inference",)} | {(v,) for v in INFERENCE_VARIANTS}
    assert all(s["type"] == "A" and s["port"] == METRICS_PORTS["inference"] for s in sd)
    assert jobs["publisher"]["authorization"]["credentials_file"] == "/prometheus/publisher.token"
    svcs = services()
    for name in ("capture", "inference", "deployer", "analytics", "projects"):
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
    used = {
        re.sub(r"_(bucket|count|sum)$", "", m)
        for e in dashboard_exprs()
        for m in re.findall(r"lensbus_[a-z0-9_]+", e)
    }
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
    done = subprocess.run(
        [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Every panel query as a recording rule: promtool parses the PromQL.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"lensbus:dashboard_query_{i}", "expr": e}
                    for i, e in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
