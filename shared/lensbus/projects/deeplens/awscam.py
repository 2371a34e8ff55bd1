"""``awscam``, the DeepLens device library's inference module, over lensbus.

``getLastFrame()`` gives the newest frame of the project's camera (BGR numpy, full size),
blocking until one newer than the last it gave arrives (DeepLens's stream ran constantly;
here frames come as the camera takes them). ``Model(model_path, {"GPU": 1})`` loads a
lensbus model package (the path ``mo.optimize`` returns, a package folder, or any file in
one) with lensbus's own backends, in this process; ``doInference(frame)`` returns
``{output name: flat numpy array}`` as DeepLens's default (DLDT) runtime did, and
``parseResult(model_type, raw)`` the guide's shapes (:mod:`.parse`).

``{"GPU": 1}`` asks for the GPU (DeepLens's Intel GPU); where the package's framework has no
GPU here the model runs on the CPU, said once in the log. ``{"GPU": 0}``: the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter

from lensbus.backends import BACKENDS, Array, Backend
from lensbus.errors import ImageError, ModelLoadError, OutputsError, PackageError
from lensbus.images import decode_jpeg
from lensbus.modelpkg import MANIFEST, Package, verify
from lensbus.projects.deeplens import runtime
from lensbus.projects.deeplens.bridge import FunctionStopped
from lensbus.projects.deeplens.parse import ResultParser, to_tensor

__all__ = ["Model", "getLastFrame"]

# How long one wait for a frame lasts before `stopping` is looked at again.
FRAME_WAIT_S = 0.5

FRAMES = Counter(
    "lensbus_deeplens_frames_total", "Frames a DeepLens function got from awscam.getLastFrame"
)


def getLastFrame() -> tuple[bool, Any]:
    """``(True, frame)``: the newest frame, newer than the last one given.

    It never answers ``(False, None)``: the samples raise on that and end their loop, which
    a frame that fails to decode should not do; such a frame is skipped (counted, logged
    once). Raises :class:`FunctionStopped` once the host stops the function.
    """
    bridge = runtime.current()
    while True:
        if bridge.stopping:
            raise FunctionStopped
        envelope = bridge.newest_frame(runtime.STATE.seq, FRAME_WAIT_S)
        if envelope is None:
            continue
        runtime.STATE.saw(envelope.camera, envelope.seq, envelope.capture_ns)
        try:
            image = decode_jpeg(envelope.data)
        except ImageError as exc:
            runtime.STATE.skipped += 1
            runtime.reject(
                "corrupt_frame", f"frame {envelope.camera}/{envelope.seq} skipped: {exc}"
            )
            continue
        FRAMES.inc()
        runtime.STATE.frames += 1
        return True, image


def package_at(model_path: str | Path) -> Package:
    """The verified lensbus package at ``model_path``: its folder, its model.json or any file
    in it (a DeepLens function named its model's .xml)."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST).is_file():
        raise ModelLoadError(
            f"awscam.Model: no lensbus model package at {str(model_path)!r} (a folder with "
            f"{MANIFEST}; mo.optimize('<name>', w, h) returns one the project's models name)"
        )
    try:
        return verify(folder)
    except PackageError as exc:
        raise ModelLoadError(f"awscam.Model: {exc}") from None


def _load(package: Package, gpu: bool) -> Backend:
    backend_cls = BACKENDS[package.manifest.framework]
    if gpu:
        try:
            return backend_cls(package, "gpu", None)
        except ModelLoadError as exc:
            runtime.warn_once("gpu", f"awscam.Model: {exc}; running on the CPU")
    return backend_cls(package, "cpu", None)


def _output_names(backend: Backend, count: int) -> list[str]:
    # DeepLens keyed outputs by layer name; ONNX models have names, others get output<i>.
    session = getattr(backend, "session", None)
    if session is not None and hasattr(session, "get_outputs"):
        names = [o.name for o in session.get_outputs()]
        if len(names) == count:
            return names
    return [f"output{i}" for i in range(count)]


class Model:
    """A lensbus model package loaded in this process, with DeepLens's methods."""

    def __init__(
        self, model_path: str | Path, loading_config: dict[str, Any] | None = None, **_: Any
    ) -> None:
        # `**_`: DeepLens's later `runtime=` keyword (its Neo runtime) changes nothing here.
        self.package = package_at(model_path)
        self.manifest = self.package.manifest
        self._backend = _load(self.package, bool((loading_config or {}).get("GPU", 0)))
        self._parser = ResultParser(self.manifest)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def doInference(self, video_frame: Any) -> dict[str, Array]:
        """``{output name: flat float array}`` for a frame already resized to the input."""
        outputs = self._backend.forward(to_tensor(video_frame, self.manifest.input))
        names = _output_names(self._backend, len(outputs))
        self._shapes = {n: np.shape(o) for n, o in zip(names, outputs, strict=True)}
        return {n: np.asarray(o).ravel() for n, o in zip(names, outputs, strict=True)}

    def parseResult(
        self, model_type: str, raw_infer_result: dict[Any, Any]
    ) -> dict[str, list[dict[str, Any]]]:
        """DeepLens's parsed result for ``ssd``, ``classification`` or ``segmentation``."""
        outputs = []
        for name, value in raw_infer_result.items():
            array = np.asarray(value)
            shape = self._shapes.get(name)
            # doInference flattened them as DeepLens did; the decoders want their shapes back.
            if shape is not None and int(np.prod(shape)) == array.size:
                array = array.reshape(shape)
            outputs.append(array)
        try:
            return self._parser(model_type, outputs)
        except OutputsError as exc:
            raise ValueError(f"parseResult({model_type!r}): {exc}") from None
