"""``lensbus project init|deploy|list|status|rollback|remove|watch|run``: projects (your own
code on the device) from the command line.

Exit codes: 0 done, 1 refused or failed (an invalid project, a conflict, nothing to roll
back to), 2 usage, 3 the deployer or NATS cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lensbus import natsauth
from lensbus.bus import split_servers
from lensbus.cli.common import (
    SubParsers,
    add_nats_options,
    checked,
)
from lensbus.cli.deploy import (
    Precheck,
    ProgressBar,
    deployer_command,
    deployer_options,
    human_bytes,
    when,
)
from lensbus.codec import DecodeError, decode
from lensbus.deployclient import DeployClient
from lensbus.errors import InvalidName, PackageError
from lensbus.projects import package, scaffold
from lensbus.schemas import ProjectDeployment, ProjectMessage, ProjectStatus
from lensbus.subjects import Subjects, validate_camera_id, validate_token, validate_topic

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# Verbs that change nothing: the read-only NATS user ``client`` may run them.

Command = Callable[[DeployClient, argparse.Namespace], Awaitable[int]]


def _project(value: str) -> str:
    return validate_token(value, "project name")


def _group(value: str) -> str:
    return validate_token(value, "group")


# ---- output ------------------------------------------------------------------------------------


def _describe(record: ProjectDeployment) -> str:
    cur = record.current
    text = f"project {record.name}: version {cur.version} on {', '.join(cur.groups)}"
    return text + f" [{record.state}]" + (f" ({record.reason})" if record.reason else "")


def _print_list(projects: list[Any], deployed: dict[str, ProjectDeployment]) -> None:
    if not projects:
        print("no projects stored; create one with: lensbus project init NAME")
        return
    rows = [("NAME", "VERSION", "RUNTIME", "SIZE", "UPLOADED", "SHA256", "DEPLOYED")]
    for p in projects:
        record = deployed.get(p.name)
        mark = ""
        if record is not None and record.current.version == p.version:
            mark = f"on {','.join(record.current.groups)}"
        rows.append(
            (
                p.name,
                p.version,
                p.runtime,
                human_bytes(p.size),
                when(p.uploaded_ns),
                p.sha256[:12],
                mark,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _print_status(projects: list[ProjectStatus]) -> None:
    if not projects:
        print("no projects deployed: lensbus project deploy DIR")
        return
    for p in projects:
        print(f"project {p.name}")
        dep = p.deployment
        if dep is None:
            print("  desired   (none: not deployed; lensbus project deploy DIR)")
        else:
            cur = dep.current
            print(
                f"  desired   version {cur.version} on {', '.join(cur.groups)}  [{dep.state}] "
                f"since {when(cur.deployed_ns)}"
            )
            if dep.reason:
                print(f"  reason    {dep.reason}")
            if dep.history:
                print(f"  history   {', '.join(h.version for h in reversed(dep.history))}")
        if not p.reports:
            print("  instances (none reporting: is lensbus-projects running?)")
        for r in p.reports:
            serving = r.serving or "nothing"
            match = ""
            if dep is not None and r.serving:
                match = (
                    "up to date"
                    if r.serving == dep.current.version
                    else f"wants {dep.current.version}"
                )
            print(
                f"  instance  {r.instance}  {r.state}  serving {serving}  handled {r.handled}  "
                f"errors {r.errors}  dropped {r.dropped}  restarts {r.restarts}  {match}".rstrip()
            )
            if r.reason:
                print(f"            reason: {r.reason}")


def jsonable(value: Any) -> Any:
    """msgpack types as JSON: bytes as base64 text."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


def message_line(message: ProjectMessage) -> str:
    return json.dumps(
        {
            "project": message.project,
            "version": message.version,
            "camera": message.camera,
            "topic": message.topic,
            "seq": message.seq,
            "capture_ns": message.capture_ns,
            "published_ns": message.published_ns,
            "payload": message.payload,
        },
        default=jsonable,
    )


# ---- commands ----------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    try:
        folder = scaffold.init(args.name, args.dir)
    except PackageError as exc:
        print(f"lensbus project init: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote project {args.name} in {folder}: project.json, handler.py, README.md")
    print(f"run it against a camera: lensbus project run {folder} --camera cam1")
    print(f"deploy it:               lensbus project deploy {folder}")
    return EXIT_OK


async def _deploy(dc: DeployClient, args: argparse.Namespace) -> int:
    path = Path(args.dir)
    bar = None if args.quiet else ProgressBar(f"uploading {path.name}")
    up = await dc.project_upload(path, progress=bar)
    assert up.project is not None
    info = up.project
    if up.created:
        print(
            f"stored project {info.name} version {info.version} ({human_bytes(info.size)}, "
            f"sha256 {info.sha256[:12]})"
        )
    else:
        print(f"project {info.name} version {info.version} was already stored, identical")
    reply = await dc.project_deploy(info.name, info.version, args.group or None)
    for change in reply.changes:
        print(change)
    print(f"the projects service swaps it in live; see it with: lensbus project status {info.name}")
    return EXIT_OK


async def _list(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.project_list(args.name)
    if args.json:
        print(json.dumps(reply.model_dump(mode="json", exclude={"ok", "error", "code", "v"})))
    else:
        _print_list(reply.projects, {d.name: d for d in reply.deployments})
    return EXIT_OK


async def _status(dc: DeployClient, args: argparse.Namespace) -> int:
    projects = await dc.project_status(args.name)
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in projects], indent=2))
    else:
        _print_status(projects)
    return EXIT_OK


async def _rollback(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.project_rollback(args.name)
    assert reply.deployment is not None
    print(_describe(reply.deployment))
    return EXIT_OK


async def _remove(dc: DeployClient, args: argparse.Namespace) -> int:
    reply = await dc.project_remove(args.name)
    for change in reply.changes:
        print(change)
    return EXIT_OK


async def _watch(dc: DeployClient, args: argparse.Namespace) -> int:
    """JSON lines of what the project publishes (its own topics, not lensbus's ``_``)."""
    subjects = Subjects(args.prefix)
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: Any) -> None:
        nonlocal seen
        try:
            _, camera, topic = subjects.project_parts(msg.subject)
            message = decode(msg.data, ProjectMessage)
        except (InvalidName, DecodeError) as exc:
            print(f"lensbus project watch: skipped {msg.subject}: {exc}", file=sys.stderr)
            return
        if topic.startswith("_") or args.camera not in (None, camera):
            return
        if args.topic not in (None, topic):
            return
        print(message_line(message), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    sub = await dc.nc.subscribe(subjects.project_all(args.name), cb=on_msg)
    await dc.nc.flush()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, done.set)
    print(f"watching project {args.name} (Ctrl-C to stop)", file=sys.stderr)
    await done.wait()
    await sub.unsubscribe()
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    """Run a project folder against a live system, reloading on change
    (:func:`lensbus.projects.devrun.run_dev`), as the project's own NATS user when
    ``--secrets`` is given and the URL names no user."""
    from lensbus.projects import devrun

    try:
        manifest = package.check(args.dir)
    except PackageError as exc:
        print(f"lensbus project run: invalid project: {exc}", file=sys.stderr)
        return EXIT_FAILED
    user = password = ""
    tls_ca = getattr(args, "tls_ca", None) or ""
    if args.secrets and not urlsplit(split_servers(args.nats_url)[0]).username:
        secrets = json.loads(Path(args.secrets).read_text())
        user = natsauth.project_user(manifest.name)
        password = natsauth.project_password(secrets["callout"]["seed"], manifest.name)
        if not tls_ca and secrets.get("tls_ca"):  # lensbus up's CA, beside its secrets
            tls_ca = str(Path(args.secrets).parent / secrets["tls_ca"])
    return devrun.run_dev(
        args.dir, args.camera, args.nats_url, user, password, args.prefix, tls_ca=tls_ca
    )


def _checked_here(args: argparse.Namespace) -> tuple[str, int] | None:
    """A bad project fails here, before anything is uploaded."""
    try:
        package.check(args.dir)
    except PackageError as exc:
        return f"invalid project: {exc}", EXIT_FAILED
    return None


def _runner(
    command: Command, verb: str, precheck: Precheck | None = None
) -> Callable[[argparse.Namespace], int]:
    return deployer_command(command, f"project {verb}", precheck)


# ---- registration ------------------------------------------------------------------------------


def register(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "project",
        help="your own code on the device: init, deploy, list, status, rollback, watch, run",
        description="Projects: a folder with project.json and a handler (on_result(result, "
        "ctx)), deployed to camera groups and swapped live like a model.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    name_type = checked(_project)

    p = verbs.add_parser("init", help="write a project that runs at once")
    p.add_argument("name", metavar="NAME", type=name_type, help="project name")
    p.add_argument("dir", metavar="DIR", nargs="?", help="folder to write (default ./NAME)")
    p.set_defaults(func=_init)

    p = verbs.add_parser(
        "deploy",
        help="check, upload and deploy a project folder",
        description="Check the folder (project.json, settings, the handler's import), upload "
        "it (the deployer checks it again and stores it once per version) and make it the "
        "project's desired release; the models or pipeline it names are set on its groups.",
    )
    p.add_argument("dir", metavar="DIR", help="project folder")
    p.add_argument(
        "--group",
        "-g",
        action="append",
        type=checked(_group),
        help="camera group (repeat for several; default: those project.json names)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    deployer_options(p)
    p.set_defaults(func=_runner(_deploy, "deploy", _checked_here))

    p = verbs.add_parser("list", help="stored project versions, and which are deployed")
    p.add_argument("--name", type=name_type, help="only this project's versions")
    p.add_argument("--json", action="store_true", help="JSON (projects and deployments)")
    deployer_options(p)
    p.set_defaults(func=_runner(_list, "list"))

    p = verbs.add_parser("status", help="desired version vs what each instance runs")
    p.add_argument("name", metavar="NAME", nargs="?", type=name_type, help="only this project")
    p.add_argument("--json", action="store_true", help="JSON (a list of ProjectStatus)")
    deployer_options(p)
    p.set_defaults(func=_runner(_status, "status"))

    for verb, command, text in (
        ("rollback", _rollback, "return a project to its previous release"),
        ("remove", _remove, "stop running a project (its stored versions stay)"),
    ):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("name", metavar="NAME", type=name_type, help="project name")
        deployer_options(p)
        p.set_defaults(func=_runner(command, verb))

    _register_live(verbs, name_type)


def _register_live(verbs: SubParsers, name_type: Callable[[str], str]) -> None:
    """``watch`` and ``run``: a project's outputs as they come."""
    p = verbs.add_parser("watch", help="JSON lines of what a project publishes")
    p.add_argument("name", metavar="NAME", type=name_type, help="project name")
    p.add_argument("--camera", type=checked(validate_camera_id), help="only this camera")
    p.add_argument("--topic", type=checked(validate_topic), help="only this topic")
    p.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    deployer_options(p)
    p.set_defaults(func=_runner(_watch, "watch"))

    p = verbs.add_parser(
        "run", help="run a project folder against a live system, reloading on change"
    )
    p.add_argument("dir", metavar="DIR", help="project folder")
    p.add_argument("--camera", "-c", action="append", type=checked(validate_camera_id))
    add_nats_options(p)
    p.set_defaults(func=_run)
