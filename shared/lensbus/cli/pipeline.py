"""``lensbus pipeline set|show|history|rollback``: a camera group's pipeline (detector,
classifiers on crops, tracking, zones) as desired state in the deployer.

Same options, users and exit codes as ``lensbus deploy``: 0 done, 1 refused (a field of
the file, a model not in the store, nothing to roll back to), 2 usage (no such file, not
JSON or YAML), 3 the deployer or NATS cannot be reached.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from lensbus.cli.common import SubParsers
from lensbus.cli.deploy import EXIT_OK, _group, deployer_command, deployer_options, when
from lensbus.deployclient import DeployClient, DeployError
from lensbus.schemas import Deployment, PipelineDeployment, PipelineRevision
from lensbus.schemas.pipeline import ClassifyStage, ModelStage, Stage, TrackStage, ZonesStage


def read_file(path: Path) -> dict[str, Any]:
    """A pipeline file's content: JSON for ``.json``, YAML for ``.yaml``/``.yml``, else
    whichever parses (YAML reads JSON too). Raises ``ValueError`` saying why not."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path}: not {kind} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: a pipeline is a mapping with 'stages', not {type(data).__name__}"
        )
    return data


def _stage_line(stage: Stage) -> str:
    if isinstance(stage, ModelStage):
        return f"model     {stage.model}"
    if isinstance(stage, ClassifyStage):
        return (
            f"classify  {stage.name}: {stage.model} on {', '.join(stage.labels)} "
            f"(at most {stage.max_crops} crops, min {stage.min_size} px)"
        )
    if isinstance(stage, TrackStage):
        return f"track     {', '.join(stage.labels) or 'all labels'}"
    assert isinstance(stage, ZonesStage)
    cams = []
    for camera, cz in stage.cameras.items():
        parts = [f"zone {z.name}" for z in cz.zones] + [f"line {ln.name}" for ln in cz.lines]
        cams.append(f"{camera}: {', '.join(parts) or 'nothing'}")
    return f"zones     {'; '.join(cams)}"


def _print_pipeline(record: PipelineDeployment, dep: Deployment | None) -> None:
    cur = record.current
    print(f"group {record.group}: pipeline revision {cur.revision} since {when(cur.activated_ns)}")
    if cur.reason:
        print(f"  reason    {cur.reason}")
    if cur.pipeline.description:
        print(f"  about     {cur.pipeline.description}")
    for stage in cur.pipeline.stages:
        print(f"  {_stage_line(stage)}")
    if dep is not None and dep.model.ref != cur.pipeline.primary.model:
        # e.g. an automatic rollback after a failed swap: the deployment decides.
        print(f"  deployed  {dep.model.ref} [{dep.state}] {dep.reason}".rstrip())


def _revision_row(rev: PipelineRevision, mark: str) -> tuple[str, ...]:
    kinds = ",".join(s.stage for s in rev.pipeline.stages)
    model = rev.pipeline.primary.model
    return (f"{rev.revision}{mark}", when(rev.activated_ns), model, kinds, rev.reason)


async def _set(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.pipeline_set(args.group, args.data)
    assert reply.pipeline is not None
    _print_pipeline(reply.pipeline, reply.deployment)
    print(
        f"inference and analytics of group {args.group} follow it live; watch with: "
        f"lensbus status --group {args.group}"
    )
    return EXIT_OK


async def _groups(dc: DeployClient, group: str | None) -> list[str]:
    if group is not None:
        return [group]
    return [g.group for g in await dc.status()]


async def _show(dc: DeployClient, args: argparse.Namespace) -> int:
    shown = []
    for group in await _groups(dc, args.group):
        try:
            reply = await dc.pipeline_get(group)
        except DeployError as exc:
            if exc.code == "not_found" and args.group is None:
                continue  # a group with a model alone
            raise
        shown.append(reply)
    if args.json:
        print(
            json.dumps(
                [r.model_dump(mode="json", exclude={"ok", "error", "code", "v"}) for r in shown],
                indent=2,
            )
        )
        return EXIT_OK
    if not shown:
        print("no pipelines yet: set one with: lensbus pipeline set --group GROUP FILE")
    for r in shown:
        assert r.pipeline is not None
        _print_pipeline(r.pipeline, r.deployment)
    return EXIT_OK


async def _history(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.pipeline_get(args.group)
    record = reply.pipeline
    assert record is not None
    rows: list[tuple[str, ...]] = [("REVISION", "SET", "MODEL", "STAGES", "REASON")]
    rows.append(_revision_row(record.current, "*"))
    rows += [_revision_row(r, "") for r in reversed(record.history)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


async def _rollback(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.pipeline_rollback(args.group)
    assert reply.pipeline is not None
    _print_pipeline(reply.pipeline, reply.deployment)
    return EXIT_OK


def _file(value: str) -> dict[str, Any]:
    try:
        return read_file(Path(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "pipeline",
        help="a camera group's pipeline: detector, classifiers on crops, tracking, zones",
        description="The stages every frame of a camera group goes through, kept by the "
        "deployer as desired state with history and rollback, like models.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser(
        "set",
        help="set a group's pipeline from a JSON or YAML file",
        description="Check FILE (every key, every model in the store, classifier labels "
        "against the detector's) and make it the group's pipeline; its model stage becomes "
        "the group's deployed model. A refusal names the field; the running pipeline stays.",
    )
    p.add_argument("data", metavar="FILE", type=_file, help="pipeline file (.json, .yaml)")
    p.add_argument("--group", "-g", required=True, type=_group, help="camera group")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_set, "pipeline set"))

    p = verbs.add_parser("show", help="the desired pipeline of each group (or one)")
    p.add_argument("--group", "-g", type=_group, help="only this group")
    p.add_argument("--json", action="store_true", help="JSON (a list of records)")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_show, "pipeline show"))

    p = verbs.add_parser("history", help="a group's pipeline revisions, newest first")
    p.add_argument("--group", "-g", required=True, type=_group, help="camera group")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_history, "pipeline history"))

    p = verbs.add_parser("rollback", help="return a group to its previous pipeline (and model)")
    p.add_argument("--group", "-g", required=True, type=_group, help="camera group")
    deployer_options(p)
    p.set_defaults(func=deployer_command(_rollback, "pipeline rollback"))
