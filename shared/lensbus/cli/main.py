"""``lensbus`` entry point: built-in commands plus those services contribute."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from lensbus import __version__
from lensbus.cli import cameras, clips, deploy, fleet, pipeline, project, schemas, up, watch

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensbus", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lensbus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    schemas.register(sub)
    deploy.register(sub)
    pipeline.register(sub)
    watch.register(sub)
    up.register(sub)
    cameras.register(sub)
    clips.register(sub)
    project.register(sub)
    fleet.register(sub)
    for ep in sorted(entry_points(group="lensbus.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            print(f"lensbus: command set {ep.name!r} unavailable: {exc}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
