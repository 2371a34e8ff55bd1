"""The ``opencv`` framework: cv2.dnn reads Caffe, Darknet, TFLite or ONNX files.

OpenCV is imported when a model loads, not with this module: the registry is imported
wherever a manifest is validated (the deployer too), and only inference runs models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from lensbus.backends.base import Array, Backend, parse_device, register, short_error, where
from lensbus.darknet import weights_size_problem
from lensbus.errors import ModelLoadError
from lensbus.modelpkg import Package


def _caffe(model: Path, config: Path | None) -> Any:
    import cv2

    if config is None:
        raise ValueError("a Caffe model needs its .prototxt as the 'config' file")
    return cv2.dnn.readNetFromCaffe(str(config), str(model))


def _darknet(model: Path, config: Path | None) -> Any:
    import cv2

    if config is None:
        raise ValueError("darknet weights need their .cfg as the 'config' file")
    # readNetFromDarknet loads a short (or another cfg's) weights file without a word and the
    # model then serves garbage, so the size is checked against the cfg first.
    problem = weights_size_problem(config, model)
    if problem:
        raise _WrongWeights(problem)
    return cv2.dnn.readNetFromDarknet(str(config), str(model))


class _WrongWeights(ValueError):
    """A weights file whose size does not fit its cfg: reported as it is, not as OpenCV's."""


def _tflite(model: Path, config: Path | None) -> Any:
    import cv2

    return cv2.dnn.readNetFromTFLite(str(model))


def _onnx(model: Path, config: Path | None) -> Any:
    import cv2

    return cv2.dnn.readNetFromONNX(str(model))


# model file suffix -> reader; the 'config' role holds the second file where one is needed
OPENCV_READERS: dict[str, Callable[[Path, Path | None], Any]] = {
    ".caffemodel": _caffe,
    ".weights": _darknet,
    ".tflite": _tflite,
    ".onnx": _onnx,
}


@register
class OpenCVBackend(Backend):
    """cv2.dnn: Caffe, Darknet, TFLite or ONNX, chosen by the model file's suffix."""

    framework: ClassVar[str] = "opencv"
    roles: ClassVar[frozenset[str]] = frozenset({"model"})
    optional_roles: ClassVar[frozenset[str]] = frozenset({"config"})
    main_role: ClassVar[str] = "model"

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        import cv2

        kind, index = parse_device(device)
        model = package.path("model")
        config = package.path("config") if "config" in package.manifest.files else None
        reader = OPENCV_READERS.get(model.suffix.lower())
        if reader is None:
            raise ModelLoadError(
                f"{where(package, 'model')}: OpenCV reads {sorted(OPENCV_READERS)} model files, "
                f"not {model.suffix or 'a file without suffix'}"
            )
        if kind == "gpu" and not _opencv_cuda():
            raise ModelLoadError(
                f"{where(package, 'model')}: device {device!r} asked for, but this OpenCV has no "
                "CUDA DNN backend or sees no GPU (pip's opencv-python is CPU-only; build OpenCV "
                "with CUDA); use device 'cpu'"
            )
        if threads:
            cv2.setNumThreads(int(threads))
        try:
            self.net = reader(model, config)
        except _WrongWeights as exc:
            raise ModelLoadError(
                f"{where(package, 'model')}: refused before loading: {exc}"
            ) from None
        except (cv2.error, ValueError) as exc:
            raise ModelLoadError(
                f"{where(package, 'model')}: OpenCV cannot read it: {short_error(exc)}"
            ) from None
        if self.net is None or self.net.empty():
            raise ModelLoadError(f"{where(package, 'model')}: OpenCV read an empty network")
        if kind == "gpu":
            cv2.cuda.setDevice(index)
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
            self.device = f"cuda:{index}"
        else:
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
            self.device = "cpu"
        self._outputs = list(self.net.getUnconnectedOutLayersNames())

    def forward(self, tensor: Array) -> list[Array]:
        self.net.setInput(tensor)
        return list(self.net.forward(self._outputs))

    def close(self) -> None:
        self.net = None


def _opencv_cuda() -> bool:
    import cv2

    try:
        return cv2.cuda.getCudaEnabledDeviceCount() > 0 and bool(
            cv2.dnn.getAvailableTargets(cv2.dnn.DNN_BACKEND_CUDA)
        )
    except cv2.error:
        return False
