"""The ``torch`` framework: a TorchScript (``.pt``, ``.ts``) or ``torch.export`` (``.pt2``) file.

One role, ``model``.  The model takes one NCHW float32 tensor and returns a tensor or a
tuple/list of tensors, which come back as numpy arrays in that order.  Runs under
``torch.inference_mode``.  ``device`` ``gpu``/``gpu:N`` runs on CUDA, and there the manifest's
``precision: fp16`` runs weights and input in half precision (outputs come back float32); on a
CPU fp16 is not applied (CPU half convolutions are slower than fp32, when they run at all) and
the load says so.

PyTorch is imported when a model loads, not with this module: the registry is imported
wherever a manifest is validated (the deployer too), and only inference runs models.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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

# The PyTorch CPU build that CI installs on Python 3.11 (lensbus-inference's torch extra).
TORCH_INSTALL = "'lensbus-inference[torch]'"
SCRIPT_SUFFIXES = (".pt", ".ts")
EXPORT_SUFFIXES = (".pt2",)

_interop_set: int | None = None
"""The inter-op thread count this process set, if it did (PyTorch takes it once only)."""


@register
class TorchBackend(Backend):
    """A TorchScript or ``torch.export`` program on the CPU or a CUDA device."""

    framework: ClassVar[str] = "torch"
    roles: ClassVar[frozenset[str]] = frozenset({"model"})
    main_role: ClassVar[str] = "model"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})

    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        torch = import_framework(package, "torch", TORCH_INSTALL)
        self._torch = torch
        kind, index = parse_device(device)
        self._file = where(package, "model")
        self.device = _device(torch, self._file, device, kind, index)
        _cap_threads(torch, threads)
        path = package.path("model")
        self._half = package.manifest.precision == "fp16" and kind == "gpu"
        if package.manifest.precision == "fp16" and not self._half:
            log.warning("%s: precision fp16 applies on a GPU only; running fp32 on cpu", self._file)
        if path.suffix in EXPORT_SUFFIXES:
            self.net = self._load_export(path, input_shape(package))
        elif path.suffix in SCRIPT_SUFFIXES:
            self.net = self._load_script(path)
        else:
            raise ModelLoadError(
                f"{self._file}: framework 'torch' reads TorchScript (.pt, .ts) or torch.export "
                f"(.pt2) files, not {path.suffix or path.name!r}"
            )
        if self._half:
            self.net.half()
        # On a CUDA device each frame is copied into this input, so a run allocates nothing.
        self._input = None
        if kind == "gpu":
            dtype = torch.float16 if self._half else torch.float32
            self._input = torch.zeros(input_shape(package), dtype=dtype, device=self.device)

    def _load_script(self, path: Path) -> Any:
        torch = self._torch
        try:
            with warnings.catch_warnings():
                # 2.13 marks torch.jit deprecated; TorchScript files are still read, and are
                # what most people have.  The warning is no news to the operator.
                warnings.filterwarnings("ignore", ".*is deprecated", DeprecationWarning)
                return torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as exc:  # RuntimeError from the zip reader or the deserializer
            raise ModelLoadError(
                f"{self._file}: not a readable TorchScript file (truncated, or not written by "
                f"torch.jit.save: a torch.save checkpoint or state_dict is not a model): "
                f"{short_error(exc)}"
            ) from None

    def _load_export(self, path: Path, want: tuple[int, ...]) -> Any:
        torch = self._torch
        try:
            with _torch_export_log() as causes:
                try:
                    program = torch.export.load(str(path))
                except Exception as exc:
                    # torch.export.load logs the cause and raises "check the warnings above"
                    raise ModelLoadError(
                        "not a readable torch.export archive (truncated, or not written by "
                        f"torch.export.save?): {'; '.join(causes) or short_error(exc)}"
                    ) from None
            _check_export_input(program, want)
            if self.device != "cpu":
                program = torch.export.passes.move_to_device_pass(program, self.device)
            return program.module()
        except ModelLoadError as exc:
            raise ModelLoadError(f"{self._file}: {exc}") from None
        except Exception as exc:
            raise ModelLoadError(
                f"{self._file}: cannot load the torch.export program: {short_error(exc)}"
            ) from None

    def forward(self, tensor: Array) -> list[Array]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(tensor)
            if self._input is not None:
                self._input.copy_(x)
                x = self._input
            return _to_numpy(self.net(x))

    def close(self) -> None:
        self.net = None
        self._input = None
        if self.device != "cpu":
            self._torch.cuda.empty_cache()


def _device(torch: Any, file: str, asked: str, kind: str, index: int) -> str:
    """``"cpu"`` or ``"cuda:N"``, once CUDA is known to be there."""
    if kind == "cpu":
        return "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ModelLoadError(
            f"{file}: device {asked!r} asked for, but PyTorch sees {count} CUDA device(s) "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use device 'cpu'"
        )
    return f"cuda:{index}"


def _cap_threads(torch: Any, threads: int | None) -> None:
    """Intra-op threads to ``threads``; inter-op threads too, where PyTorch still lets us.

    Both are process-wide: a second model loaded during a swap sets the same numbers.
    PyTorch takes the inter-op count only before its first parallel work and raises after,
    so it is set once per process, and a later different count is logged, not fatal: a
    single-input model has no inter-op parallelism to cap.
    """
    global _interop_set
    if not threads:
        return
    torch.set_num_threads(int(threads))
    if _interop_set == threads:
        return
    try:
        torch.set_num_interop_threads(int(threads))
        _interop_set = threads
    except RuntimeError:
        log.info(
            "torch: inter-op threads already fixed at %d in this process; intra-op capped to %d",
            torch.get_num_interop_threads(),
            threads,
        )
        _interop_set = threads


class _Causes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.causes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.causes.append(short_error(exc) if exc else record.getMessage())


@contextmanager
def _torch_export_log() -> Iterator[list[str]]:
    """What ``torch.export`` logs meanwhile, kept for our error instead of printed: on a bad
    file it writes a whole traceback to stderr, then raises an exception without the cause."""
    logger = logging.getLogger("torch.export")
    handler, propagate = _Causes(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.causes
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _check_export_input(program: Any, want: tuple[int, ...]) -> None:
    """One user input, its static dimensions those the manifest's input makes."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        raise ModelLoadError(f"expected one image input, the program has {names}")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    val = node.meta.get("val")
    have = tuple(getattr(val, "shape", ()))
    if len(have) != 4 or any(
        isinstance(h, int) and h != w for h, w in zip(have, want, strict=False)
    ):
        raise ModelLoadError(
            f"the program's input {names[0]!r} has shape {list(have)}, but the manifest's "
            f"input makes {want}"
        )


def _to_numpy(out: Any) -> list[Array]:
    """A tensor or a (nested) tuple/list of them -> float32 (or integer) numpy arrays."""
    if isinstance(out, list | tuple):
        return [a for o in out for a in _to_numpy(o)]
    if not hasattr(out, "detach"):
        raise TypeError(f"the model returned {type(out).__name__}, not a tensor or tensors")
    t = out.detach()
    if t.is_floating_point() and t.dtype.itemsize < 4:
        t = t.float()  # fp16 on a GPU: the decoders read float32
    return [np.asarray(t.cpu().numpy())]
