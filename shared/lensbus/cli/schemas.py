"""``lensbus schemas export|check``: the JSON Schema of every message, in ``docs/schemas``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lensbus.schemas import EXPORTED, SCHEMA_VERSION


def render() -> dict[str, str]:
    """File name -> JSON text for every exported schema."""
    out = {}
    for name, model in EXPORTED.items():
        schema: dict[str, Any] = model.model_json_schema(mode="validation")
        schema["$id"] = f"lensbus/{name}.v{SCHEMA_VERSION}.json"
        schema["x-lensbus-encoding"] = "msgpack map; bytes fields are msgpack bin"
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written


def stale(out_dir: Path) -> list[str]:
    """Names of schema files in ``out_dir`` that differ from the code (or are missing)."""
    bad = []
    for name, text in render().items():
        path = out_dir / name
        if not path.is_file() or path.read_text() != text:
            bad.append(name)
    return bad


def _export(args: argparse.Namespace) -> int:
    for path in export(Path(args.out)):
        print(path)
    return 0


def _check(args: argparse.Namespace) -> int:
    bad = stale(Path(args.out))
    if bad:
        print(
            f"out of date in {args.out}: {', '.join(bad)}; run 'lensbus schemas export'",
            file=sys.stderr,
        )
        return 1
    print(f"{args.out}: up to date")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("schemas", help="export or check the messages' JSON Schemas")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, func, doc in (
        ("export", _export, "write the JSON Schema files"),
        ("check", _check, "fail if the files differ from the code"),
    ):
        p = verbs.add_parser(verb, help=doc)
        p.add_argument("--out", default="docs/schemas", help="folder (default docs/schemas)")
        p.set_defaults(func=func)
