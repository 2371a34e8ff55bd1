"""One backend per framework: load a verified package's files, run a tensor through them.

``BACKENDS[manifest.framework](package, device, threads)`` builds one; ``forward(tensor)``
returns the model's outputs as numpy arrays, in the model's output order.  Every way loading
can fail (corrupt or wrong file, missing GPU, unreadable graph) is a :class:`ModelLoadError`
whose message names the package, the file and the cause.

Devices: ``"cpu"``, ``"gpu"`` / ``"gpu:N"`` (``"cuda"`` / ``"cuda:N"`` are the same).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from lensbus.modelpkg import Package

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]


class ModelLoadError(Exception):
    """A model that cannot be loaded or run; the message names the file and what is wrong."""


_DEVICE = re.compile(r"^(cpu|gpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ``("cpu", 0)``, ``"gpu:1"`` / ``"cuda:1"`` -> ``("gpu", 1)``."""
    m = _DEVICE.match(device.strip().lower())
    if not m:
        raise ModelLoadError(f"device {device!r} is not one of cpu, gpu, gpu:N (or cuda, cuda:N)")
    kind = "cpu" if m.group(1) == "cpu" else "gpu"
    if kind == "cpu" and m.group(2) not in (None, "0"):
        raise ModelLoadError(f"device {device!r}: there is only one CPU device, use 'cpu'")
    return kind, int(m.group(2) or 0)


def where(package: Package, role: str) -> str:
    """``name:version (file)``, for error messages."""
    entry = package.manifest.files.get(role)
    return f"{package.manifest.ref} ({entry.path if entry else role})"


def input_shape(package: Package) -> tuple[int, int, int, int]:
    spec = package.manifest.input
    if spec.layout == "NCHW":
        return (1, 3, spec.height, spec.width)
    return (1, spec.height, spec.width, 3)


class Backend(Protocol):
    framework: ClassVar[str]
    device: str  # as reported, e.g. "cpu", "gpu(0)", "cuda:0"

    def __init__(self, package: Package, device: str, threads: int | None) -> None: ...

    def forward(self, tensor: Array) -> list[Array]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ mxnet


class MXNetBackend:
    """``<prefix>-symbol.json`` + ``<prefix>-0000.params`` through Gluon's SymbolBlock.

    CPU: ``optimize_for(backend='MKLDNN')`` with a static graph, which fuses conv + BN + ReLU
    (3-4x faster than plain hybridize on MobileNetV2, DESIGN.md; the same speed on
    yolov3-tiny, whose BN darknet.py already folded and whose leaky ReLU does not fuse),
    falling back to ``hybridize(static_alloc, static_shape)`` when this MXNet build has no
    MKLDNN.  GPU: ``mx.gpu(N)``, hybridized.
    """

    framework: ClassVar[str] = "mxnet"

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        mx = _import_mxnet(threads)
        kind, index = parse_device(device)
        symbol, params = package.path("symbol"), package.path("params")
        if kind == "gpu":
            if mx.context.num_gpus() == 0:
                raise ModelLoadError(
                    f"{where(package, 'params')}: device {device!r} asked for, but MXNet sees no "
                    "GPU (mx.context.num_gpus() == 0; a CUDA build of MXNet, mxnet-cuXXX, and a "
                    "driver are needed); use device 'cpu'"
                )
            ctx = mx.gpu(index)
        else:
            ctx = mx.cpu()
        self.device = f"gpu({index})" if kind == "gpu" else "cpu"
        self._mx = mx
        self._ctx = ctx
        input_name = self._input_name(package, symbol, params)
        try:
            with warnings.catch_warnings():
                # "Cannot decide type for the following arguments": float32 is used, as meant
                warnings.filterwarnings("ignore", "Cannot decide type", UserWarning)
                self.net = mx.gluon.SymbolBlock.imports(
                    str(symbol), [input_name], str(params), ctx=ctx
                )
        except Exception as exc:  # MXNetError, JSON errors, shape/name mismatches
            raise ModelLoadError(
                f"{where(package, 'params')}: cannot load the MXNet model from "
                f"{symbol.name} + {params.name}: {short_error(exc)}"
            ) from None
        shape = input_shape(package)
        # The input lives on the device; each frame is copied into it (mx.nd.array would
        # allocate every time and probes a deprecated scipy namespace on each call).
        self._input = mx.nd.zeros(shape, ctx=ctx, dtype=np.float32)
        try:
            self._optimize(self._input, kind)
        except Exception as exc:
            raise ModelLoadError(
                f"{package.manifest.ref} ({symbol.name} + {params.name}): the model does not "
                f"run on input {shape} "
                f"(manifest input {package.manifest.input.width}x{package.manifest.input.height} "
                f"{package.manifest.input.layout}): {short_error(exc)}"
            ) from None

    def _input_name(self, package: Package, symbol: Path, params: Path) -> str:
        """The one graph input that is not a parameter (``data`` in Gluon exports)."""
        mx = self._mx
        try:
            sym = mx.sym.load(str(symbol))
        except Exception as exc:
            raise ModelLoadError(
                f"{where(package, 'symbol')}: not an MXNet symbol file: {short_error(exc)}"
            ) from None
        try:
            names = {k.split(":", 1)[-1] for k in mx.nd.load(str(params))}
        except Exception as exc:
            raise ModelLoadError(
                f"{where(package, 'params')}: not a readable MXNet params file: {short_error(exc)}"
            ) from None
        inputs = [n for n in sym.list_inputs() if n not in names]
        if len(inputs) != 1:
            raise ModelLoadError(
                f"{where(package, 'symbol')}: expected one image input besides the parameters, "
                f"found {inputs or 'none'} (do the symbol and params files belong together?)"
            )
        return inputs[0]

    def _optimize(self, x: Any, kind: str) -> None:
        if kind == "cpu" and self._mx.runtime.Features().is_enabled("MKLDNN"):
            self.net.optimize_for(x, backend="MKLDNN", static_alloc=True, static_shape=True)
        else:
            if kind == "cpu":
                log.info("MXNet has no MKLDNN: running hybridize(static) without it (slower)")
            self.net.hybridize(static_alloc=True, static_shape=True)
            self.net(x)
        self._mx.nd.waitall()  # MXNet is asynchronous: surface errors of the first run here

    def forward(self, tensor: Array) -> list[Array]:
        self._input[:] = tensor
        out = self.net(self._input)
        if isinstance(out, list | tuple):
            return [o.asnumpy() for o in out]
        return [out.asnumpy()]

    def close(self) -> None:
        self.net = None
        self._mx.nd.waitall()


def _mxnet_threads(threads: int | None) -> None:
    """Set MXNet's operator thread count, which it reads once, when it is imported.

    Later calls (``MXSetNumOMPThreads``, ``OMP_NUM_THREADS``) change nothing.  Left alone on
    a 2-core machine MXNet keeps one core for its engine and runs operators on one thread:
    yolov3-tiny 57 ms instead of 35 ms.  So: ``threads`` if given, else every core, unless
    the environment already says (``MXNET_OMP_MAX_THREADS``).  Once MXNet is imported it
    keeps what it has.
    """
    wanted = str(threads) if threads else None
    if "mxnet" not in sys.modules:
        if wanted:
            os.environ["MXNET_OMP_MAX_THREADS"] = wanted
        else:
            os.environ.setdefault("MXNET_OMP_MAX_THREADS", str(os.cpu_count() or 1))
    elif wanted and os.environ.get("MXNET_OMP_MAX_THREADS") != wanted:
        log.warning(
            "MXNet was imported before the model was loaded, so threads=%s cannot apply; set "
            "MXNET_OMP_MAX_THREADS=%s in the environment instead",
            threads,
            threads,
        )


def _import_mxnet(threads: int | None) -> Any:
    _mxnet_threads(threads)
    import mxnet as mx

    return mx


# ------------------------------------------------------------------------------ onnx


class OnnxBackend:
    """An ``.onnx`` file through onnxruntime (all graph optimizations, CUDA when asked)."""

    framework: ClassVar[str] = "onnx"

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        import onnxruntime as ort

        kind, index = parse_device(device)
        path = package.path("model")
        providers: list[Any] = ["CPUExecutionProvider"]
        if kind == "gpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    f"{where(package, 'model')}: device {device!r} asked for, but onnxruntime "
                    f"has no CUDAExecutionProvider (available: {ort.get_available_providers()}; "
                    "install onnxruntime-gpu); use device 'cpu'"
                )
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not our log
        # ORT's idle workers spin after each run by default.  Here they share the cores with
        # JPEG decoding, NATS and, during a model swap, a second session: measured on 2
        # cores, two spinning sessions made each 2x slower; not spinning costs ~1 ms alone.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = self._read(package, path)
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:
            raise ModelLoadError(
                f"{where(package, 'model')}: onnxruntime cannot load it: {short_error(exc)}"
            ) from None
        if kind == "gpu" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ModelLoadError(
                f"{where(package, 'model')}: the CUDA provider did not start (CUDA/cuDNN "
                "libraries missing?); use device 'cpu'"
            )
        self.device = f"cuda:{index}" if kind == "gpu" else "cpu"
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(
                f"{where(package, 'model')}: expected one image input, the graph has "
                f"{[i.name for i in inputs]}"
            )
        self.input_name = inputs[0].name
        want = input_shape(package)
        have = inputs[0].shape
        if len(have) != 4 or any(
            isinstance(h, int) and h != w for h, w in zip(have, want, strict=False)
        ):
            raise ModelLoadError(
                f"{where(package, 'model')}: the graph's input {self.input_name!r} has shape "
                f"{have}, but the manifest's input makes {want}"
            )

    @staticmethod
    def _read(package: Package, path: Path) -> bytes | str:
        """The model to hand to ORT: the path, or bytes with initializer inputs stripped."""
        import onnx
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, OSError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{where(package, 'model')}: not a readable ONNX model (truncated or not ONNX?): "
                f"{short_error(exc)}"
            ) from None
        init_names = {t.name for t in model.graph.initializer}
        if not any(i.name in init_names for i in model.graph.input):
            return str(path)
        # Weights listed as graph inputs (mxnet's exporter does it) keep onnxruntime from
        # folding constants: ~30% slower.  Strip them, with the exporter's own helper.
        _mxnet_threads(None)  # darknet.py imports MXNet: let it start with its threads set
        from lensbus_inference.darknet import _strip_initializer_inputs

        _strip_initializer_inputs(model)
        log.info("%s: stripped weights listed as graph inputs", where(package, "model"))
        return bytes(model.SerializeToString())

    def forward(self, tensor: Array) -> list[Array]:
        return [np.asarray(o) for o in self.session.run(None, {self.input_name: tensor})]

    def close(self) -> None:
        del self.session


# ------------------------------------------------------------------------------ opencv


def _caffe(model: Path, config: Path | None) -> Any:
    if config is None:
        raise ValueError("a Caffe model needs its .prototxt as the 'config' file")
    return cv2.dnn.readNetFromCaffe(str(config), str(model))


def _darknet(model: Path, config: Path | None) -> Any:
    if config is None:
        raise ValueError("darknet weights need their .cfg as the 'config' file")
    return cv2.dnn.readNetFromDarknet(str(config), str(model))


def _tflite(model: Path, config: Path | None) -> Any:
    return cv2.dnn.readNetFromTFLite(str(model))


def _onnx(model: Path, config: Path | None) -> Any:
    return cv2.dnn.readNetFromONNX(str(model))


# model file suffix -> reader; the 'config' role holds the second file where one is needed
OPENCV_READERS: dict[str, Callable[[Path, Path | None], Any]] = {
    ".caffemodel": _caffe,
    ".weights": _darknet,
    ".tflite": _tflite,
    ".onnx": _onnx,
}


class OpenCVBackend:
    """cv2.dnn: Caffe, Darknet, TFLite or ONNX, chosen by the model file's suffix."""

    framework: ClassVar[str] = "opencv"

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
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
    try:
        return cv2.cuda.getCudaEnabledDeviceCount() > 0 and bool(
            cv2.dnn.getAvailableTargets(cv2.dnn.DNN_BACKEND_CUDA)
        )
    except cv2.error:
        return False


def short_error(exc: BaseException) -> str:
    """The useful part of an exception: MXNet and OpenCV wrap it in source locations."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # MXNet: "Traceback ...", "File "../src/x.cc", line N", "MXNetError: Check failed: ..."
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "Stack trace"))]
    text = " ".join(ln.lstrip("> ") for ln in lines)
    # OpenCV: "OpenCV(4.11.0) /io/opencv/modules/.../x.cpp:106: error: (-5:Bad argument) ..."
    text = re.sub(r"OpenCV\([\d.]+\) \S+:\d+: error: ", "", text)
    return text[:400] or type(exc).__name__


BACKENDS: dict[str, type[Backend]] = {
    "mxnet": MXNetBackend,
    "onnx": OnnxBackend,
    "opencv": OpenCVBackend,
}
