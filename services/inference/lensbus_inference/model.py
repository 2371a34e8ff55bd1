"""The model as the service sees it: load a package, run frames, get results.

::

    model = load_model(open_package(path), device="cpu")
    model.warmup()                       # ModelLoadError if outputs do not fit the decoder
    inf = model.run(bgr, frame_w, frame_h)

``run`` takes a BGR uint8 image, which may be a reduced-scale decode of a
``frame_w x frame_h`` frame (see :attr:`LoadedModel.input_size` and
``lensbus.images.reduction_for``); boxes come back normalized and in pixels of the full frame.
The backend (:data:`lensbus.backends.BACKENDS`), preprocessing (``preprocess.Preprocessor``)
and decoder (:data:`lensbus.decoders.DECODERS`) are chosen from the manifest, which was
validated against those registries (its ``decoder_options`` included) when it was read.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from lensbus.backends import BACKENDS, Backend, short_error, where
from lensbus.decoders import Decoder, decoder_for
from lensbus.errors import ModelLoadError, OutputsError
from lensbus.modelpkg import Package
from lensbus.schemas import ClassScore, Detection, Manifest, ModelRef, Segment
from lensbus_inference.preprocess import Preprocessor

__all__ = ["Inference", "LoadedModel", "ModelLoadError", "load_model"]


@dataclass
class Inference:
    """What one run produced, and the seconds each stage took."""

    detections: list[Detection] = field(default_factory=list)
    classes: list[ClassScore] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    mask_png: bytes | None = None
    preprocess_s: float = 0.0
    compute_s: float = 0.0
    postprocess_s: float = 0.0


class LoadedModel:
    """A package loaded on a device, ready to run frames.  ``run`` is serialised by a lock."""

    def __init__(
        self, package: Package, backend: Backend, preprocess: Preprocessor, decoder: Decoder
    ) -> None:
        self.package = package
        self.manifest: Manifest = package.manifest
        self.device: str = backend.device
        self._backend = backend
        self._preprocess = preprocess
        self._decoder = decoder
        self._lock = threading.Lock()
        self._main_file = where(package, type(backend).main_role)
        self._blank_outputs: list[npt.NDArray[Any]] = []  # the warm-up's, for its check

    @property
    def ref(self) -> ModelRef:
        """How results, the heartbeat and the metrics name this model."""
        m = self.manifest
        return ModelRef(name=m.name, version=m.version, framework=m.framework, device=self.device)

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)`` of the model input, to pick a JPEG reduced-scale decode."""
        return self.manifest.input.width, self.manifest.input.height

    def run(self, image: npt.NDArray[np.uint8], frame_w: int, frame_h: int) -> Inference:
        with self._lock:
            t0 = time.perf_counter()
            prepared = self._preprocess(image)
            t1 = time.perf_counter()
            outputs = self._backend.forward(prepared.tensor)
            t2 = time.perf_counter()
            decoded = self._decoder(outputs, prepared.geometry, frame_w, frame_h)
            t3 = time.perf_counter()
        return Inference(
            detections=decoded.detections,
            classes=decoded.classes,
            segments=decoded.segments,
            mask_png=decoded.mask_png,
            preprocess_s=t1 - t0,
            compute_s=t2 - t1,
            postprocess_s=t3 - t2,
        )

    def warmup(self, runs: int = 1) -> None:
        """Build, run a blank frame, check the outputs fit the decoder and are not degenerate
        (see :func:`degenerate`), then run ``runs`` more: allocates and tunes."""
        for step in self.warmup_steps(runs):
            step()

    def warmup_steps(self, runs: int = 1) -> list[Callable[[], None]]:
        """:meth:`warmup` one step at a time, each about one run of the model or less
        (MXNet's first run: two to four), so a swap can take each between two served
        frames: the build (MXNet's graph pass), the first run on a blank frame (the
        slowest: allocations, kernels chosen), the check (a noise frame, see
        :func:`degenerate`), ``runs`` more."""
        step = functools.partial
        return [
            self.build,
            step(self.warmup_step, "first"),
            step(self.warmup_step, "check"),
            *[step(self.warmup_step, "run")] * runs,
        ]

    def build(self) -> None:
        with self._lock:
            self._backend.build()

    def warmup_step(self, kind: Literal["first", "check", "run"]) -> None:
        """One warm-up run.  ``first``: a blank frame, its outputs kept for the check;
        ``check``: the blank frame's outputs fit the decoder and differ from a noise
        frame's (not degenerate); ``run``: a blank frame as a frame is run."""
        w, h = self.input_size
        blank = np.zeros((h, w, 3), dtype=np.uint8)
        file = self._main_file
        try:
            if kind == "first":
                with self._lock:
                    # a copy: a backend may hand out its own buffers, reused by the next run
                    outs = self._backend.forward(self._preprocess(blank).tensor)
                    self._blank_outputs = [np.array(o) for o in outs]
            elif kind == "check":
                outputs = self._blank_outputs
                self._decoder.check(outputs)
                with self._lock:
                    other = self._backend.forward(self._preprocess(_noise(w, h)).tensor)
                problem = degenerate(outputs, list(other))
                if problem:
                    raise ModelLoadError(f"{file}: degenerate outputs at warm-up: {problem}")
                self._blank_outputs = []
            else:
                self.run(blank, w, h)
        except OutputsError as exc:
            raise ModelLoadError(
                f"{file}: outputs do not fit decoder {self.manifest.decoder!r}: {exc}"
            ) from None
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{file}: warm-up run failed on a {w}x{h} input: {short_error(exc)}"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._backend.close()


def _noise(w: int, h: int) -> npt.NDArray[np.uint8]:
    """A frame as unlike a blank one as a frame gets; seeded, so a failure repeats."""
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def degenerate(blank: list[npt.NDArray[Any]], noise: list[npt.NDArray[Any]]) -> str | None:
    """Why outputs for a blank and a noise frame show broken weights, or ``None``.

    NaN or Inf anywhere is never a real output.  All outputs exactly equal for two so
    different inputs means the input does not reach them (zeroed or constant weights): a
    blank frame alone may rightly give nothing, so the two are compared, not either judged.
    """
    for name, outs in (("a blank", blank), ("a noise", noise)):
        for i, out in enumerate(outs):
            arr = np.asarray(out)
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                bad = int(arr.size - np.isfinite(arr).sum())
                return f"output {i} holds {bad} NaN/Inf of {arr.size} values on {name} frame"
    same = len(blank) == len(noise) and all(
        np.array_equal(a, b) for a, b in zip(blank, noise, strict=True)
    )
    if same:
        return "identical for a blank and a noise frame (weights zeroed, constant or broken)"
    return None


def load_model(
    package: Package, device: str = "cpu", threads: int | None = None, mask_png: bool = False
) -> LoadedModel:
    """Load ``package`` on ``device`` (``cpu``, ``gpu``, ``gpu:N``); call ``warmup`` next.

    ``threads`` caps the framework's intra-op threads (None: ORT's and OpenCV's default, all
    cores for MXNet, whose own default leaves one core idle; see ``lensbus.backends.mxnet``).
    ``mask_png``: segmentation results carry the class map as a PNG.
    """
    manifest = package.manifest
    backend_cls = BACKENDS.get(manifest.framework)
    if backend_cls is None:  # the manifest was valid, so its backend was unregistered since
        raise ModelLoadError(f"{manifest.ref}: no backend for framework {manifest.framework!r}")
    try:
        decoder = decoder_for(manifest, mask_png)
    except OutputsError as exc:  # e.g. more classes than a PNG mask holds
        file = where(package, backend_cls.main_role)
        raise ModelLoadError(f"{file}: decoder {manifest.decoder!r}: {exc}") from None
    backend = backend_cls(package, device, threads)
    return LoadedModel(package, backend, Preprocessor(manifest.input), decoder)
