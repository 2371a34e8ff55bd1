"""Which Python runs ``lensbus up``'s inference child: MXNet 1.9.1 runs only on Python 3.11
(numpy<1.24), so with ``--backend mxnet`` on a newer Python, inference (and the build of its
demo model) runs from an environment of its own: ``--inference-python`` or
$LENSBUS_INFERENCE_PYTHON (``make up`` passes .venv311's)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from lensbus.errors import LensbusError

# The framework a demo backend imports where it is not installed everywhere: MXNet 1.9.1 runs
# only on Python 3.11 (numpy<1.24), so its inference child runs from an environment of its own.
FRAMEWORK_MODULES = {"mxnet": "mxnet", "torch": "torch"}
PYTHON_ENV = "LENSBUS_INFERENCE_PYTHON"


class InferencePythonError(LensbusError):
    """No Python here can run the asked framework, with what to do about it."""


def model_framework(args: argparse.Namespace) -> str | None:
    """The framework inference must run: ``--backend``'s, or the ``--model`` folder's."""
    if args.backend:
        return str(args.backend)
    manifest = Path(args.model or "") / "model.json"
    if args.model and manifest.is_file():
        with contextlib.suppress(ValueError, OSError):
            return str(json.loads(manifest.read_text()).get("framework"))
    return None


def inference_python(framework: str | None, given: str | None) -> str:
    """The Python that runs inference and builds its demo model: ``given`` (``--inference-python``
    or $LENSBUS_INFERENCE_PYTHON) if set, else this one, if the framework is installed here."""
    module = FRAMEWORK_MODULES.get(framework or "")
    if not given:
        if module is None or importlib.util.find_spec(module) is not None:
            return sys.executable
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise InferencePythonError(
            f"{framework} is not installed in this Python ({here}): pass --inference-python "
            f"PATH, a Python with 'lensbus-inference[{framework}]' (MXNet needs Python 3.11); "
            f'`make up ARGS="--backend {framework}"` makes .venv311 and passes it'
        )
    imports = ", ".join(["lensbus_inference", *([module] if module else [])])
    try:
        done = subprocess.run(
            [given, "-c", f"import {imports}"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InferencePythonError(f"--inference-python {given}: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise InferencePythonError(f"--inference-python {given} cannot import {imports}: {last}")
    return given


def choose_python(args: argparse.Namespace, from_env: str | None) -> str:
    """``lensbus up``'s choice: ``--inference-python``, else $LENSBUS_INFERENCE_PYTHON, else
    this Python when it has the framework of ``--backend`` / ``--model``."""
    given = args.inference_python or from_env or None
    return inference_python(model_framework(args), given)
