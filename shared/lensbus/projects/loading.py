"""Loading a project in its process: its ``project.json`` and its handler module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from lensbus.schemas.project import MANIFEST_FILE, ProjectManifest


def load_manifest(project_dir: Path) -> ProjectManifest:
    return ProjectManifest.model_validate_json((project_dir / MANIFEST_FILE).read_bytes())


def load_module(project_dir: Path, relative: str) -> ModuleType:
    """Import the project's handler file; the project folder first on ``sys.path``."""
    path = project_dir / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} is not in the project")
    folder = str(project_dir.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {relative}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
