"""``mo``, DeepLens's model optimizer, over the project's lensbus model packages.

On DeepLens ``mo.optimize(model_name, input_width, input_height)`` converted the model
artifacts named ``model_name`` for the device and answered ``(error, model_path)``. Here the
models a project needs are lensbus packages, already converted, that the projects service
unpacked for it (``LENSBUS_PROJECT_MODELS``, one folder per ``<name>-<version>``, see
:mod:`lensbus.projects.control`): ``optimize`` finds the one ``model_name`` names
(``'name'`` or ``'name:version'``) and answers ``(0, its folder)``, which ``awscam.Model``
opens. ``platform`` and ``aux_inputs`` are taken and ignored (the package says its
framework). A name the project does not have answers ``(2, the reason)``: DeepLens's code 2,
"Model optimizer failed", with the reason where the path would be, and in the log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lensbus.modelpkg import MANIFEST
from lensbus.projects.control import ENV_MODELS
from lensbus.projects.deeplens import runtime

__all__ = ["optimize"]

OK = 0
FAILED = 2


def models_dir() -> str:
    bridge = runtime.STATE.bridge
    return bridge.models_dir if bridge is not None else os.environ.get(ENV_MODELS, "")


def _name_version(folder: Path) -> tuple[str, str] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return str(manifest["name"]), str(manifest["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find(model_name: str, root: str | Path) -> Path | None:
    """The package folder under ``root`` that ``model_name`` ('name' or 'name:version')
    names; with several versions of a name and none given, the newest (numerically)."""
    name, _, version = model_name.partition(":")
    found: list[tuple[str, Path]] = []
    base = Path(root)
    folders = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    for folder in folders:
        nv = _name_version(folder)
        if nv and nv[0] == name and (not version or nv[1] == version):
            found.append((nv[1], folder))
    if not found:
        return None
    return max(
        found, key=lambda vf: (vf[0].isdigit(), int(vf[0]) if vf[0].isdigit() else 0, vf[0])
    )[1]


def optimize(
    model_name: str,
    input_width: int,
    input_height: int,
    platform: str = "mxNet",
    aux_inputs: dict[str, Any] | None = None,
) -> tuple[int, str]:
    """``(0, package folder)``, or ``(2, reason)`` when the project has no such model."""
    root = models_dir()
    folder = find(str(model_name), root) if root else None
    if folder is None:
        have = sorted(p.name for p in Path(root).iterdir()) if root and Path(root).is_dir() else []
        reason = (
            f"mo.optimize: no model {model_name!r} among the project's models "
            f"({', '.join(have) or 'none'}): name it in project.json's 'models'"
        )
        runtime.log.error("%s", reason)
        return FAILED, reason
    return OK, str(folder)
