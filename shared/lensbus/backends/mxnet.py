"""The ``mxnet`` framework: ``<prefix>-symbol.json`` + ``<prefix>-0000.params``."""

from __future__ import annotations

import logging
import os
import sys
import warnings
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


@register
class MXNetBackend(Backend):
    """``<prefix>-symbol.json`` + ``<prefix>-0000.params`` through Gluon's SymbolBlock.

    CPU: ``optimize_for(backend='MKLDNN')`` with a static graph, which fuses conv + BN + ReLU
    (3-4x faster than plain hybridize on MobileNetV2, docs/architecture.md; the same speed on
    yolov3-tiny, whose BN the darknet importer already folded and whose leaky ReLU does not
    fuse), falling back to ``hybridize(static_alloc, static_shape)`` when this MXNet build
    has no MKLDNN.  GPU: ``mx.gpu(N)``, hybridized.
    """

    framework: ClassVar[str] = "mxnet"
    roles: ClassVar[frozenset[str]] = frozenset({"symbol", "params"})
    main_role: ClassVar[str] = "params"
    loads_on_serving_threads: ClassVar[bool] = True

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        mx = _import_mxnet(package, threads)
        kind, index = parse_device(device)
        symbol, params = package.path("symbol"), package.path("params")
        if kind == "gpu" and mx.context.num_gpus() == 0:
            raise ModelLoadError(
                f"{where(package, 'params')}: device {device!r} asked for, but MXNet sees no "
                "GPU (mx.context.num_gpus() == 0; a CUDA build of MXNet, mxnet-cuXXX, and a "
                "driver are needed); use device 'cpu'"
            )
        ctx = mx.gpu(index) if kind == "gpu" else mx.cpu()
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
        # The input lives on the device; each frame is copied into it (mx.nd.array would
        # allocate every time and probes a deprecated scipy namespace on each call).
        self._input = mx.nd.zeros(input_shape(package), ctx=ctx, dtype=np.float32)
        self._kind = kind
        self._package = package
        self._built = False

    def build(self) -> None:
        """The graph pass and its first run (``optimize_for``/``hybridize``): 70-170 ms on
        yolov3-tiny, about three runs' compute, on the engine threads serving frames."""
        if self._built:
            return
        try:
            self._optimize(self._input, self._kind)
        except Exception as exc:
            m = self._package.manifest
            symbol, params = self._package.path("symbol"), self._package.path("params")
            raise ModelLoadError(
                f"{m.ref} ({symbol.name} + {params.name}): the model does not "
                f"run on input {tuple(self._input.shape)} "
                f"(manifest input {m.input.width}x{m.input.height} {m.input.layout}): "
                f"{short_error(exc)}"
            ) from None
        self._built = True

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
        name: str = inputs[0]
        return name

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
        self.build()
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


# MXNet 1.9.1 needs Python 3.11 and numpy<1.24: the extra that installs it pins both.
MXNET_INSTALL = "'lensbus-inference[mxnet]' (Python 3.11 only: it pins numpy<1.24)"


def _import_mxnet(package: Package, threads: int | None) -> Any:
    _mxnet_threads(threads)
    return import_framework(package, "mxnet", MXNET_INSTALL)
