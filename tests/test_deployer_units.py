"""The deployer's decisions as pure functions: history, rollback, automatic rollback, status,
model info kept in object headers; and the CLI's ``models`` group shared with inference."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from lensbus.cli import deploy as deploy_cli
from lensbus.schemas import (
    Deployment,
    Manifest,
    ModelRef,
    ModelVersionRef,
    Status,
    SwapReport,
)
from lensbus.schemas.deploy import HISTORY_LENGTH
from lensbus_deployer import decisions, model_objects
from lensbus_deployer.decisions import Heartbeat
from lensbus_deployer.errors import Refused

ROOT = Path(__file__).resolve().parent.parent


def ref(version: str, name: str = "det") -> ModelVersionRef:
    return ModelVersionRef(name=name, version=version)


def report(version: str, state: str = "failed", t: int = 10, instance: str = "i1") -> SwapReport:
    return SwapReport(
        group="g",
        instance=instance,
        desired=ref(version),
        state=state,  # type: ignore[arg-type]
        reason="load: bad weights" if state == "failed" else "",
        time_ns=t,
    )


def test_activate_keeps_history_bounded_and_most_recent_last() -> None:
    dep = decisions.activate(None, "g", ref("1"), 1)
    assert dep.model == ref("1") and dep.history == [] and dep.state == "active"
    dep = decisions.activate(dep, "g", ref("2"), 2)
    assert dep.history == [ref("1")]
    # The same model again: history unchanged (no duplicate entry), failure cleared.
    again = decisions.activate(dep.model_copy(update={"state": "failed"}), "g", ref("2"), 3)
    assert again.history == [ref("1")] and again.state == "active"
    last = 2 + HISTORY_LENGTH + 5
    for i in range(3, last + 1):
        dep = decisions.activate(dep, "g", ref(str(i)), i)
    assert dep.model == ref(str(last)) and len(dep.history) == HISTORY_LENGTH
    # Most recent last; the oldest fell off.
    assert dep.history[-1] == ref(str(last - 1))
    assert dep.history[0] == ref(str(last - HISTORY_LENGTH))


def test_activate_after_a_failed_first_deployment_does_not_keep_it() -> None:
    failed = Deployment(group="g", model=ref("1"), activated_ns=1, state="failed", reason="x")
    assert decisions.activate(failed, "g", ref("2"), 2).history == []


def test_rollback_pops_history_and_says_why() -> None:
    dep = decisions.activate(decisions.activate(None, "g", ref("1"), 1), "g", ref("2"), 2)
    back = decisions.rollback(dep, "g", 3)
    assert back.model == ref("1") and back.history == [] and back.state == "rolled_back"
    assert "det:2" in back.reason
    with pytest.raises(Refused, match="nothing to roll back to") as exc:
        decisions.rollback(back, "g", 4)
    assert exc.value.code == "conflict"
    with pytest.raises(Refused) as exc:
        decisions.rollback(None, "g", 4)
    assert exc.value.code == "not_found"


def test_auto_rollback_only_for_the_current_model_and_once() -> None:
    dep = decisions.activate(decisions.activate(None, "g", ref("1"), 1), "g", ref("2"), 2)
    assert decisions.auto_rollback(dep, report("2", "serving"), 5) is None
    assert decisions.auto_rollback(dep, report("1"), 5) is None  # not the desired model
    back = decisions.auto_rollback(dep, report("2"), 5)
    assert back is not None
    assert back.model == ref("1") and back.state == "rolled_back" and back.history == []
    assert "det:2 failed on i1: load: bad weights" in back.reason
    assert back.reason.startswith(decisions.AUTOMATIC)
    # The same failure reported again (or by a second instance) changes nothing more.
    assert decisions.auto_rollback(back, report("2", instance="i2"), 6) is None


def test_auto_rollback_without_history_marks_failed_once() -> None:
    dep = decisions.activate(None, "g", ref("1"), 1)
    failed = decisions.auto_rollback(dep, report("1"), 5)
    assert failed is not None and failed.state == "failed" and failed.model == ref("1")
    assert "nothing to roll back to" in failed.reason
    assert decisions.auto_rollback(failed, report("1", instance="i2"), 6) is None


def manifest(version: str = "1") -> Manifest:
    sha = "ab" * 32
    return Manifest(
        name="det",
        version=version,
        framework="opencv",
        task="detection",
        decoder="ssd",
        input={"width": 300, "height": 300},  # type: ignore[arg-type]
        labels=["face"],
        files={"model": {"path": "m.caffemodel", "sha256": sha, "size": 3}},  # type: ignore[dict-item]
    )


def test_model_info_round_trips_through_object_headers() -> None:
    m = manifest()
    content = model_objects.content_sha256(m)
    headers = model_objects.object_headers(m, "cd" * 32, content, 1234)
    # As nats-py hands them back, and as a Go client would write them (plain strings).
    import base64

    digest = "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex("cd" * 32)).decode()
    info = model_objects.model_info("det/1", 99, digest, "a face detector", headers)
    assert info is not None
    assert (info.name, info.version, info.framework, info.task) == (
        "det",
        "1",
        "opencv",
        "detection",
    )
    assert (info.size, info.sha256, info.uploaded_ns) == (99, "cd" * 32, 1234)
    assert info.description == "a face detector"
    flat = {k: v[0] for k, v in headers.items()}
    assert model_objects.model_info("det/1", 99, None, None, flat) is not None
    # Objects lensbus did not put, or whose name does not match, are not models.
    assert model_objects.model_info("other", 1, digest, None, {}) is None
    assert model_objects.model_info("det/2", 99, digest, None, headers) is None
    # Identity is the manifest (files' sha256), not the archive bytes.
    assert model_objects.content_sha256(manifest()) == content
    assert model_objects.content_sha256(manifest("2")) != content


def beat(
    instance: str,
    group: str,
    version: str | None,
    t: int,
    state: str = "running",
    interval: float = 1.0,
) -> Heartbeat:
    model = ModelRef(name="det", version=version) if version else None
    status = Status(
        service="inference",
        instance=instance,
        state=state,  # type: ignore[arg-type]
        version="0.1.0",
        time_ns=t,
        interval_s=interval,
        model=model,
        detail={"group": group},
    )
    return Heartbeat(status, t)


def test_group_status_merges_deployments_reports_and_heartbeats() -> None:
    now = 100 * 10**9
    dep = decisions.activate(decisions.activate(None, "g", ref("1"), 1), "g", ref("2"), 2)
    reports = [report("2", "failed", t=now - 10**9, instance="i1")]
    beats = [
        beat("i1", "g", "1", now - 10**8),  # still serving v1 after failing v2
        beat("i2", "g", "2", now - 10**8),
        beat("i3", "g", "2", now - 60 * 10**9),  # silent for a minute
        beat("o1", "other", "1", now),
    ]
    groups = decisions.group_statuses({"g": dep}, reports, beats, now)
    assert [g.group for g in groups] == ["g", "other"]
    g = groups[0]
    states = {i.instance: (i.state, i.serving.ref if i.serving else None) for i in g.instances}
    assert states == {
        "i1": ("failed", "det:1"),
        "i2": ("running", "det:2"),
        "i3": ("offline", None),
    }
    assert g.last_failure == "det:2 failed on i1: load: bad weights"
    assert decisions.group_statuses({"g": dep}, reports, beats, now, only="other")[0].group == (
        "other"
    )


def test_group_status_keeps_failure_after_report_is_overwritten() -> None:
    dep = decisions.activate(decisions.activate(None, "g", ref("1"), 1), "g", ref("2"), 2)
    back = decisions.auto_rollback(dep, report("2"), 50)
    assert back is not None
    # After the rollback the instance reports "serving" v1: the failure is in the record.
    groups = decisions.group_statuses({"g": back}, [report("1", "serving", t=60)], [], 70)
    assert "det:2 failed on i1" in groups[0].last_failure


def test_latest_is_highest_upload_time() -> None:
    from lensbus.schemas import ModelInfo

    def info(v: str, t: int) -> ModelInfo:
        return ModelInfo(
            name="det",
            version=v,
            framework="opencv",
            task="detection",
            size=1,
            sha256="",
            uploaded_ns=t,
        )

    latest = model_objects.latest([info("10", 1), info("9", 3), info("11", 2)], "det")
    assert latest is not None and latest.version == "9"
    assert model_objects.latest([], "det") is None


# ---- the CLI's `models` group is shared with the inference package ---------------------------


def _fake_inference_register(sub: argparse._SubParsersAction) -> None:
    verbs = deploy_cli.models_verbs(sub)
    verbs.add_parser("import-darknet").set_defaults(func=lambda a: "import")


def _inference_register():  # the real one, where the inference package's source is present
    path = ROOT / "services" / "inference" / "lensbus_inference" / "cli.py"
    if not path.is_file():
        return _fake_inference_register
    spec = importlib.util.spec_from_file_location("_lensbus_inference_cli_for_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.register


@pytest.mark.parametrize("deploy_first", [True, False])
def test_models_group_merges_in_either_order(deploy_first: bool) -> None:
    parser = argparse.ArgumentParser(prog="lensbus")
    sub = parser.add_subparsers(dest="command", required=True)
    inference_register = _inference_register()
    order = [deploy_cli.register, inference_register]
    for register in order if deploy_first else reversed(order):
        register(sub)
    args = parser.parse_args(["models", "upload", "pkg", "--nats-url", "nats://h:1"])
    assert args.path == "pkg" and args.nats_url == "nats://h:1"
    args = parser.parse_args(["models", "list", "--json"])
    assert args.json is True
    verbs = deploy_cli.models_verbs(sub)
    assert {"upload", "list", "import-darknet"} <= set(verbs.choices)


def test_cli_arguments_are_validated() -> None:
    from lensbus.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["deploy", "det:2", "--group", "lobby"])
    assert args.model == ("det", "2") and args.group == "lobby"
    assert parser.parse_args(["deploy", "det", "-g", "lobby"]).model == ("det", None)
    for bad in (
        ["deploy", "de t", "-g", "x"],
        ["deploy", "det", "-g", "a.b"],
        ["rollback"],
        ["status", "--prefix", "a..b"],
    ):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2
