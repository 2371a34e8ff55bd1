"""A camera group's pipeline as desired state in the deployer: ``lensbus pipeline
set|show|history|rollback`` as a user runs them (``python -m lensbus.cli.main``), against a
real deployer and nats-server, with the real demo packages in the store (YOLOv3-tiny:
detection, COCO labels; text-orientation: classification)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import msgpack
import nats as nats_py
import pytest
from test_deployer import deployment, kv_entry, start_deployer
from test_deployer_cli import lensbus

from lensbus import decode, encode
from lensbus.codec import DecodeError
from lensbus.modelpkg import MANIFEST, verify
from lensbus.natsserver import NatsServer
from lensbus.schemas import PipelineDeployment, PipelineReply
from lensbus.schemas.deploy import pipeline_key
from lensbus.subjects import DEPLOYMENTS_BUCKET, Subjects

pytestmark = pytest.mark.slow

YOLO = "yolov3-tiny-onnx"
CLASSIFIER = "text-orientation-onnx"

PIPELINE_YAML = """\
description: people at the front door, and which way their text is
stages:
  - stage: model
    model: {yolo}
  - stage: classify
    name: orientation
    model: {cls}
    labels: [person, book]
    max_crops: 4
  - stage: track
    labels: [person]
  - stage: zones
    cameras:
      front-door:
        zones:
          - name: porch
            points: [[0.1, 0.5], [0.6, 0.5], [0.6, 1.0]]
            labels: [person]
            loiter_s: 30
        lines:
          - {{name: door, a: [0.4, 0.2], b: [0.4, 0.9]}}
"""


def ref(folder: Path) -> str:
    m = verify(folder).manifest
    return f"{m.name}:{m.version}"


def another_version(folder: Path, dest: Path, version: str) -> Path:
    """The same package under another version (the files, and their sha256, unchanged)."""
    shutil.copytree(folder, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["version"] = version
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


async def stored(url: str, group: str) -> tuple[PipelineDeployment, int]:
    got = await kv_entry(url, pipeline_key(group))
    assert got is not None, f"no pipeline of group {group}"
    return decode(got[0], PipelineDeployment), got[1]


def pipeline_of(yolo: str, cls: str, **changes: Any) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load(PIPELINE_YAML.format(yolo=yolo, cls=cls))
    for path, value in changes.items():
        *where, last = path.split("/")
        node: Any = data
        for key in where:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


@pytest.fixture
def store(fresh_nats: NatsServer, start_service, demo_models, tmp_path: Path) -> dict[str, str]:
    """A deployer with YOLOv3-tiny (two versions) and the classifier uploaded."""
    start_deployer(start_service, fresh_nats, tmp_path, max_package_bytes=128 * 1024 * 1024)
    yolo2 = another_version(demo_models[YOLO], tmp_path / "yolo2", "2")
    for folder in (demo_models[YOLO], demo_models[CLASSIFIER], yolo2):
        r = lensbus("models", "upload", "-q", str(folder), url=fresh_nats.url)
        assert r.returncode == 0, r.stderr
    return {
        "yolo": ref(demo_models[YOLO]),
        "cls": ref(demo_models[CLASSIFIER]),
        "yolo2": ref(yolo2),
    }


def test_set_show_history_rollback_and_deploy_follow(
    fresh_nats: NatsServer, store: dict[str, str], tmp_path: Path
) -> None:
    url, yolo, cls, yolo2 = fresh_nats.url, store["yolo"], store["cls"], store["yolo2"]
    # A group with a model alone works as before, and has no pipeline.
    r = lensbus("deploy", yolo, "--group", "plain", url=url)
    assert r.returncode == 0, r.stderr
    r = lensbus("pipeline", "show", "--group", "plain", url=url)
    assert r.returncode == 1 and "has no pipeline" in r.stderr
    r = lensbus("pipeline", "show", url=url)
    assert r.returncode == 0 and "no pipelines yet" in r.stdout

    yaml_file = tmp_path / "door.yaml"
    yaml_file.write_text(PIPELINE_YAML.format(yolo=yolo, cls=cls))
    r = lensbus("pipeline", "set", "--group", "door", str(yaml_file), url=url)
    assert r.returncode == 0, r.stderr
    assert "group door: pipeline revision 1" in r.stdout
    assert f"classify  orientation: {cls} on person, book" in r.stdout
    rec, _ = asyncio.run(stored(url, "door"))
    assert rec.revision == 1 and rec.pipeline.primary.model == yolo and rec.history == []
    dep, _ = asyncio.run(deployment(url, "door"))
    assert dep.model.ref == yolo and dep.pipeline_revision == 1

    # JSON, by suffix: a second revision (the classifier on persons only).
    json_file = tmp_path / "door2.json"
    json_file.write_text(json.dumps(pipeline_of(yolo, cls, **{"stages/1/labels": ["person"]})))
    r = lensbus("pipeline", "set", "-g", "door", str(json_file), url=url)
    assert r.returncode == 0 and "pipeline revision 2" in r.stdout, r.stderr

    # `lensbus deploy` on the group replaces its model stage: revision 3.
    r = lensbus("deploy", yolo2, "--group", "door", url=url)
    assert r.returncode == 0, r.stderr
    rec, _ = asyncio.run(stored(url, "door"))
    assert rec.revision == 3 and rec.pipeline.primary.model == yolo2
    assert rec.current.reason == f"deploy {yolo2}"
    assert rec.pipeline.stages[1:] == rec.history[-1].pipeline.stages[1:]
    dep, _ = asyncio.run(deployment(url, "door"))
    assert dep.model.ref == yolo2 and dep.pipeline_revision == 3

    # A model the pipeline cannot follow (a classifier first) is refused; nothing changes.
    before = asyncio.run(kv_entry(url, pipeline_key("door")))
    r = lensbus("deploy", cls, "--group", "door", url=url)
    assert r.returncode == 1 and f"stages[0].model: {cls} is a classification model" in r.stderr
    assert asyncio.run(kv_entry(url, pipeline_key("door"))) == before
    assert asyncio.run(deployment(url, "door"))[0].model.ref == yolo2

    r = lensbus("pipeline", "history", "--group", "door", url=url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["REVISION", "SET", "MODEL", "STAGES", "REASON"]
    assert [ln.split()[0] for ln in lines[1:]] == ["3*", "2", "1"]
    assert yolo2 in lines[1] and "model,classify,track,zones" in lines[1]

    # Rollback: the pipeline of revision 2, as revision 4, and its model with it.
    r = lensbus("pipeline", "rollback", "--group", "door", url=url)
    assert r.returncode == 0, r.stderr
    assert "reason    rollback from revision 3 to revision 2" in r.stdout
    rec, _ = asyncio.run(stored(url, "door"))
    assert rec.revision == 4 and rec.pipeline.primary.model == yolo
    assert [h.revision for h in rec.history] == [1]
    dep, _ = asyncio.run(deployment(url, "door"))
    assert dep.model.ref == yolo and dep.pipeline_revision == 4

    # A model rollback moves the pipeline's model stage too.
    r = lensbus("rollback", "--group", "door", url=url)
    assert r.returncode == 0, r.stderr
    rec, _ = asyncio.run(stored(url, "door"))
    dep, _ = asyncio.run(deployment(url, "door"))
    assert rec.revision == 5 and rec.pipeline.primary.model == dep.model.ref == yolo2
    assert dep.pipeline_revision == 5

    r = lensbus("status", "--group", "door", url=url)
    assert r.returncode == 0 and "pipeline  revision 5" in r.stdout, r.stdout
    r = lensbus("pipeline", "show", "--json", url=url)  # the client user's read
    assert r.returncode == 0, r.stderr
    (shown,) = json.loads(r.stdout)
    assert shown["pipeline"]["group"] == "door" and shown["pipeline"]["current"]["revision"] == 5
    assert shown["deployment"]["model"]["version"] == "2"


def refusals(yolo: str, cls: str) -> list[tuple[dict[str, Any], str, str]]:
    """(pipeline, code, what stderr says) for each kind of bad pipeline."""
    zone = "stages/3/cameras/front-door/zones/0"
    return [
        (pipeline_of(yolo, cls, **{"stages/2": {"stage": "blur"}}), "bad_request", "stages.2: "),
        (
            pipeline_of(yolo, "car-kind:3"),
            "not_found",
            "stages[1].model: car-kind:3 is not in the store",
        ),
        (
            pipeline_of(yolo, cls, **{"stages/1/labels": ["person", "taxi"]}),
            "bad_request",
            f"stages[1].labels: 'taxi' is not a label of {yolo}",
        ),
        (
            pipeline_of(yolo, cls, **{f"{zone}/labels": ["unicorn"]}),
            "bad_request",
            f"stages[3].cameras.front-door.zones[0].labels: 'unicorn' is not a label of {yolo}",
        ),
        (
            pipeline_of(yolo, yolo),
            "bad_request",
            f"stages[1].model: {yolo} is a detection model; a classify stage needs a "
            "classification model",
        ),
        (
            pipeline_of(cls, cls, **{"stages/1/labels": ["up"]}),
            "bad_request",
            f"stages[0].model: {cls} is a classification model",
        ),
        (
            pipeline_of(yolo, cls, **{f"{zone}/points": [[0.1, 0.5], [0.6, 0.5]]}),
            "bad_request",
            "stages.3.cameras.front-door.zones.0.points: List should have at least 3 items",
        ),
        (
            pipeline_of(yolo, cls, **{f"{zone}/points": [[0.1, 0.5], [1.6, 0.5], [0, 1]]}),
            "bad_request",
            "stages.3.cameras.front-door.zones.0.points.1.0: Input should be less than or equal",
        ),
        (
            pipeline_of(yolo, cls, **{"stages/2/max_age": 3}),
            "bad_request",
            "stages.2.max_age: Extra inputs are not permitted",
        ),
    ]


def test_bad_pipelines_are_refused_naming_the_field(
    fresh_nats: NatsServer, store: dict[str, str], tmp_path: Path
) -> None:
    url, yolo, cls = fresh_nats.url, store["yolo"], store["cls"]
    good = tmp_path / "good.yaml"
    good.write_text(PIPELINE_YAML.format(yolo=yolo, cls=cls))
    assert lensbus("pipeline", "set", "-g", "door", str(good), url=url).returncode == 0
    before = asyncio.run(kv_entry(url, pipeline_key("door")))
    dep_before = asyncio.run(kv_entry(url, "group.door"))

    for i, (data, code, said) in enumerate(refusals(yolo, cls)):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(json.dumps(data))
        r = lensbus("pipeline", "set", "-g", "door", str(bad), url=url)
        assert r.returncode == 1, (said, r.stdout, r.stderr)
        assert f"refused ({code})" in r.stderr and said in r.stderr, (said, r.stderr)
    # The deployer itself refuses, too, whoever sends the request (not only the CLI).
    raw = pipeline_of(yolo, cls, **{"stages/3/cameras/front-door/zones/0/points": [[0, 0]]})
    reply = asyncio.run(raw_set(url, "door", raw))
    assert not reply.ok and reply.code == "bad_request"
    assert "pipeline.stages.3.zones.cameras.front-door.zones.0.points" in reply.error

    # The running pipeline, and the group's model, are untouched.
    assert asyncio.run(kv_entry(url, pipeline_key("door"))) == before
    assert asyncio.run(kv_entry(url, "group.door")) == dep_before

    # Usage errors: no such file, not YAML, not a mapping (exit 2).
    r = lensbus("pipeline", "set", "-g", "door", str(tmp_path / "nope.yaml"), url=url)
    assert r.returncode == 2 and "cannot read it" in r.stderr
    (tmp_path / "list.yaml").write_text("- stage: model\n")
    r = lensbus("pipeline", "set", "-g", "door", str(tmp_path / "list.yaml"), url=url)
    assert r.returncode == 2 and "a pipeline is a mapping" in r.stderr
    r = lensbus("pipeline", "rollback", "-g", "door", url=url)
    assert r.returncode == 1 and "nothing to roll back to" in r.stderr
    r = lensbus("pipeline", "rollback", "-g", "nowhere", url=url)
    assert r.returncode == 1 and "refused (not_found)" in r.stderr

    # A record this deployer cannot read (a newer one wrote a stage key it does not know):
    # shown as such, not as no pipeline; a new `set` replaces it.
    asyncio.run(put_raw(url, "door", newer_record(before[0] if before else b"")))
    r = lensbus("pipeline", "show", "-g", "door", url=url)
    assert r.returncode == 1 and "refused (conflict)" in r.stderr
    assert "cannot be read by this deployer" in r.stderr and "blur_faces" in r.stderr
    r = lensbus("pipeline", "set", "-g", "door", str(good), url=url)
    assert r.returncode == 0 and "pipeline revision 1" in r.stdout, r.stderr


def newer_record(data: bytes) -> bytes:
    """A record as a newer lensbus might write it: a field in the record and in its
    revision (ignored by this one) and a key in the pipeline's track stage (refused)."""
    raw = msgpack.unpackb(data, raw=False)
    raw["owner"] = "ops"
    raw["current"]["signed_by"] = "ops"
    raw["current"]["pipeline"]["stages"][2]["blur_faces"] = True
    return msgpack.packb(raw, use_bin_type=True)


async def put_raw(url: str, group: str, value: bytes) -> None:
    nc = await nats_py.connect(url)
    try:
        kv = await nc.jetstream().key_value(DEPLOYMENTS_BUCKET)
        await kv.put(pipeline_key(group), value)
    finally:
        await nc.close()


def test_an_older_reader_ignores_new_record_fields_but_not_new_pipeline_keys() -> None:
    """Pure decoding: the record is wire (tolerant), the pipeline in it configuration
    (strict): a reader does not run a pipeline with a setting it does not know left out."""
    ok = PipelineDeployment.model_validate(
        {
            "group": "door",
            "current": {
                "revision": 1,
                "activated_ns": 1,
                "pipeline": pipeline_of("yolo:1", "cls:1"),
            },
        }
    )
    raw = msgpack.unpackb(encode(ok), raw=False)
    raw["owner"] = "ops"
    raw["current"]["signed_by"] = "ops"
    assert decode(msgpack.packb(raw, use_bin_type=True), PipelineDeployment) == ok
    with pytest.raises(DecodeError, match="blur_faces"):
        decode(newer_record(encode(ok)), PipelineDeployment)


async def raw_set(url: str, group: str, pipeline: dict[str, Any]) -> PipelineReply:
    """A ``pipeline_set`` request as any program may send it, unchecked by the client."""
    nc = await nats_py.connect(url)
    try:
        body = {"v": 1, "group": group, "pipeline": pipeline}
        msg = await nc.request(
            Subjects().deployer_api("pipeline_set"), msgpack.packb(body), timeout=10
        )
        return decode(msg.data, PipelineReply)
    finally:
        await nc.close()


def test_labels_of_a_package_stored_without_the_labels_header(demo_models, tmp_path: Path) -> None:
    """A package a deployer before pipelines stored has no labels header: its model.json,
    the archive's first member, is read instead."""
    from lensbus.modelpkg import pack
    from lensbus_deployer.model_objects import header_labels, object_headers
    from lensbus_deployer.store import _archive_manifest

    archive = pack(demo_models[YOLO], tmp_path / "yolo.tar.gz")
    manifest = _archive_manifest(archive.read_bytes())
    assert manifest.labels == verify(demo_models[YOLO]).manifest.labels
    assert "person" in manifest.labels and len(manifest.labels) == 80
    headers = object_headers(manifest, "a" * 64, "b" * 64, 1)
    assert header_labels(headers) == manifest.labels
    assert header_labels({k: v for k, v in headers.items() if k != "Lensbus-Labels"}) is None
    assert header_labels({"Lensbus-Labels": ["not json"]}) is None
