"""Darknet YOLO cfg + weights -> model packages: one per importer target (ONNX, MXNet,
PyTorch), each built from the same :mod:`.darknet_plan` plan, and the files as they are for
OpenCV's darknet reader.

A target whose framework is not installed here is skipped, saying what to install: the ONNX
target needs only onnx (a dependency of lensbus-inference), MXNet and PyTorch are extras.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensbus.backends import BACKENDS
from lensbus.backends.mxnet import MXNET_INSTALL
from lensbus.backends.torch import TORCH_INSTALL
from lensbus_inference.packaging.darknet_cfg import parse_cfg
from lensbus_inference.packaging.darknet_plan import Plan, plan_darknet
from lensbus_inference.packaging.folders import MissingAssetError, cached, fresh, write

# what the importer's targets (and OpenCV's darknet reader) expect: RGB / 255, stretched
YOLO_INPUT: dict[str, Any] = {"layout": "NCHW", "color": "rgb", "scale": 1 / 255}


@dataclass(frozen=True)
class Target:
    """An importer target: ``export(plan, folder, prefix) -> {role: path}`` in ``module``
    (of this package), which imports the framework ``needs``."""

    module: str
    export: str
    needs: str
    install: str

    def exporter(self) -> Callable[[Plan, Path, str], dict[str, str]]:
        module = importlib.import_module(f"lensbus_inference.packaging.{self.module}")
        func: Callable[[Plan, Path, str], dict[str, str]] = getattr(module, self.export)
        return func


# framework (of the manifest) -> target; the order build-demo and import-darknet list them
TARGETS: dict[str, Target] = {
    "onnx": Target("darknet_onnx", "export_onnx", "onnx", "'lensbus-inference' (onnx)"),
    "mxnet": Target("darknet", "export_mxnet", "mxnet", MXNET_INSTALL),
    "torch": Target("darknet_torch", "export_torch", "torch", TORCH_INSTALL),
}


def unavailable(framework: str) -> str | None:
    """Why the ``framework`` target cannot build here (what to install), or ``None``."""
    target = TARGETS[framework]
    spec = importlib.util.find_spec(target.needs)
    if spec is None or spec.origin is None:  # no origin: a folder of that name, not the package
        return f"the {framework} target needs {target.needs}: install {target.install}"
    if framework not in BACKENDS:
        return f"no {framework!r} backend in this lensbus reads the {framework} package"
    return None


def read_labels(path: str | Path) -> list[str]:
    """One label per line (darknet ``.names``); blank lines dropped."""
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"{path}: no labels in it")
    return labels


def darknet_manifest(
    cfg: Path, labels: list[str], name: str, version: str, description: str
) -> dict[str, Any]:
    sections = parse_cfg(cfg)
    net = sections[0]
    classes = {int(s.get("classes", 20)) for s in sections if s["type"] == "yolo"}
    if classes != {len(labels)}:
        raise ValueError(
            f"{cfg.name} has {sorted(classes)} classes but the labels file has {len(labels)} "
            "names; pass the names file that belongs to this cfg"
        )
    return {
        "name": name,
        "version": version,
        "task": "detection",
        "decoder": "yolo",
        "input": {**YOLO_INPUT, "width": int(net["width"]), "height": int(net["height"])},
        "labels": labels,
        "score_threshold": 0.5,
        "nms_threshold": 0.45,
        "description": description,
    }


def _frameworks(asked: list[str] | None, skipped: list[str] | None, name: str) -> list[str]:
    """The targets to build: those asked for (all by default) that can build here.  One that
    cannot is noted in ``skipped``, or raises where it was asked for or nothing is noted."""
    ready = []
    for framework in asked or list(TARGETS):
        why = unavailable(framework)
        if why is None:
            ready.append(framework)
        elif asked or skipped is None:
            raise MissingAssetError(why)
        else:
            skipped.append(f"{name}-{framework}: {why}")
    return ready


def import_darknet_packages(
    cfg: str | Path,
    weights: str | Path,
    labels: list[str],
    out_dir: str | Path,
    name: str,
    version: str = "1",
    description: str = "",
    frameworks: list[str] | None = None,
    skipped: list[str] | None = None,
) -> dict[str, Path]:
    """Convert a darknet YOLO to packages ``<out_dir>/<name>-<framework>``: framework -> folder.

    ``frameworks`` (default: every target that can build here, the others noted in
    ``skipped``); a folder that already verifies is kept as it is.
    """
    cfg, weights, out = Path(cfg), Path(weights), Path(out_dir)
    folders = {fw: out / f"{name}-{fw}" for fw in _frameworks(frameworks, skipped, name)}
    todo = [fw for fw, folder in folders.items() if not cached(folder)]
    if todo:
        base = darknet_manifest(cfg, labels, name, version, description)
        plan = plan_darknet(cfg, weights)  # refuses what it cannot build before any writing
        for framework in todo:
            _build(plan, framework, folders[framework], base)
    return folders


def _build(plan: Plan, framework: str, folder: Path, base: dict[str, Any]) -> None:
    staging = fresh(folder.parent, folder.name)
    try:
        paths = TARGETS[framework].exporter()(plan, staging, base["name"])
        files = {role: Path(path).name for role, path in paths.items()}
        write(staging, folder, files, framework=framework, **base)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when renamed into place


def darknet_opencv_package(
    cfg: str | Path,
    weights: str | Path,
    labels: list[str],
    out_dir: str | Path,
    name: str,
    version: str = "1",
    description: str = "",
) -> Path:
    """The darknet files as they are, for OpenCV's reader: ``<out_dir>/<name>-opencv``."""
    cfg, weights = Path(cfg), Path(weights)
    folder = Path(out_dir) / f"{name}-opencv"
    if cached(folder):
        return folder
    base = darknet_manifest(cfg, labels, name, version, description)
    staging = fresh(Path(out_dir), f"{name}-opencv")
    shutil.copyfile(cfg, staging / cfg.name)
    shutil.copyfile(weights, staging / weights.name)
    files = {"model": weights.name, "config": cfg.name}
    return write(staging, folder, files, framework="opencv", **base)
