"""Package folders as the builders write them: found assets, staged, verified, renamed into
place when complete (so a reader never sees half a package)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lensbus.errors import PackageError
from lensbus.modelpkg import verify, write_package

log = logging.getLogger(__name__)


class MissingAssetError(RuntimeError):
    """A file or framework a build needs is not installed; the message says what to install."""


def asset_dir(module: str, install: str, *files: str, sub: str = "") -> Path:
    """The folder of an installed (never imported) package that holds ``files``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {module!r} is not installed: run '{install}'")
    root = Path(next(iter(spec.submodule_search_locations))) / sub
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise MissingAssetError(f"{root}: missing {missing}; reinstall with '{install}'")
    return root


def cached(folder: Path) -> Path | None:
    """``folder`` when it holds a package that verifies (reused as it is), else ``None``."""
    if not (folder / "model.json").is_file():
        return None
    try:
        verify(folder)
    except PackageError as exc:
        log.warning("rebuilding %s: %s", folder, exc)
        return None
    return folder


def fresh(out: Path, name: str) -> Path:
    """An empty staging folder beside the final one (renamed into place when complete)."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))


def install(staging: Path, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    folder.chmod(0o755)  # mkdtemp made it private
    return folder


def write(staging: Path, folder: Path, files: dict[str, str], **manifest: Any) -> Path:
    """The manifest into ``staging``, then ``staging`` renamed to ``folder``."""
    # The package is named after its folder (e.g. yolov3-tiny-onnx): the model store keys
    # packages by name:version, so each framework's build needs a name of its own.
    write_package(staging, files, **{**manifest, "name": folder.name})
    return install(staging, folder)
