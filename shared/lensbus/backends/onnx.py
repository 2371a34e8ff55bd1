"""The ``onnx`` framework: an ``.onnx`` file through onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lensbus.backends.base import (
    Array,
    Backend,
    import_framework,
    input_shape,
    parse_device,
    register,
    short_error,
    where,
)
from lensbus.errors import ModelLoadError
from lensbus.modelpkg import Package

log = logging.getLogger(__name__)


def strip_initializer_inputs(model: Any) -> None:
    """Drop graph inputs that are really initializers (weights), in place.

    mxnet's exporter lists every weight as a graph input too.  ONNX (IR >= 4) treats such
    inputs as overridable defaults, so onnxruntime may not constant-fold or pre-pack them
    (and warns about each).  Measured on yolov3-tiny, 2 CPU cores: ~38 ms vs ~29 ms per frame.
    Only the image stays as an input.
    """
    init_names = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(keep)


@register
class OnnxBackend(Backend):
    """An ``.onnx`` file through onnxruntime (all graph optimizations, CUDA when asked)."""

    framework: ClassVar[str] = "onnx"
    roles: ClassVar[frozenset[str]] = frozenset({"model"})
    main_role: ClassVar[str] = "model"

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        ort = import_framework(package, "onnxruntime", "'lensbus-inference' (onnxruntime)")
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
        self.input_name = self._check_input(package)

    def _check_input(self, package: Package) -> str:
        """The graph's one input, whose shape must be what the manifest's input makes."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(
                f"{where(package, 'model')}: expected one image input, the graph has "
                f"{[i.name for i in inputs]}"
            )
        name: str = inputs[0].name
        want = input_shape(package)
        have = inputs[0].shape
        if len(have) != 4 or any(
            isinstance(h, int) and h != w for h, w in zip(have, want, strict=False)
        ):
            raise ModelLoadError(
                f"{where(package, 'model')}: the graph's input {name!r} has shape "
                f"{have}, but the manifest's input makes {want}"
            )
        return name

    @staticmethod
    def _read(package: Package, path: Path) -> bytes | str:
        """The model to hand to ORT: the path, or bytes with initializer inputs stripped."""
        import onnx
        from google.protobuf.message import DecodeError as ProtobufDecodeError

        try:
            model = onnx.load(str(path), load_external_data=False)
        except (ProtobufDecodeError, ValueError, OSError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{where(package, 'model')}: not a readable ONNX model (truncated or not ONNX?): "
                f"{short_error(exc)}"
            ) from None
        init_names = {t.name for t in model.graph.initializer}
        if not any(i.name in init_names for i in model.graph.input):
            return str(path)
        # Weights listed as graph inputs (mxnet's exporter does it) keep onnxruntime from
        # folding constants: ~30% slower.  Strip them.
        strip_initializer_inputs(model)
        log.info("%s: stripped weights listed as graph inputs", where(package, "model"))
        return bytes(model.SerializeToString())

    def forward(self, tensor: Array) -> list[Array]:
        return [np.asarray(o) for o in self.session.run(None, {self.input_name: tensor})]

    def close(self) -> None:
        del self.session
