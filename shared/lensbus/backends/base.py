"""What every backend is, the registry that collects them, and their shared helpers.

A backend loads a verified package's files and runs a tensor through them:
``BACKENDS[manifest.framework](package, device, threads)`` builds one; ``forward(tensor)``
returns the model's outputs as numpy arrays, in the model's output order.  Every way loading
can fail (corrupt or wrong file, missing GPU, unreadable graph) is a
:class:`~lensbus.errors.ModelLoadError` whose message names the package, the file and the
cause.

Devices: ``"cpu"``, ``"gpu"`` / ``"gpu:N"`` (``"cuda"`` / ``"cuda:N"`` are the same), any
case; :func:`parse_device` is the one reading of them, for the backends and the settings.
"""

from __future__ import annotations

import importlib
import re
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy.typing as npt

from lensbus.errors import ModelLoadError

if TYPE_CHECKING:
    from lensbus.modelpkg import Package

Array = npt.NDArray[Any]


class Backend(ABC):
    """One framework's way of loading a package and running it.

    A backend is one module that subclasses this, sets the class attributes and decorates
    the class with :func:`register`; the manifest then accepts its ``framework`` key and
    checks a package has its ``roles``.

    The manifest's ``precision`` is the one backend setting it carries: a backend lists the
    values it runs in ``precisions`` and the manifest refuses the others.  A backend that
    needs more would declare a pydantic ``Options`` model here, as decoders do
    (:class:`lensbus.decoders.Decoder`), and the manifest would validate a
    ``backend_options`` field through this registry the way it validates ``decoder_options``.
    """

    framework: ClassVar[str]
    """The manifest's ``framework`` value."""
    roles: ClassVar[frozenset[str]]
    """The file roles a package must have (``manifest.files`` keys)."""
    optional_roles: ClassVar[frozenset[str]] = frozenset()
    """Roles the backend reads when a package has them."""
    main_role: ClassVar[str]
    """The file a load or warm-up error is reported against."""
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    """The manifest ``precision`` values the backend runs (``fp16``: half precision on GPU)."""

    loads_on_serving_threads: ClassVar[bool] = False
    """Loading computes on the threads that run frames (MXNet's engine copies the weights
    in): a live swap then loads in a frame's turn, not beside one."""

    device: str
    """The device as the framework reports it, e.g. ``"cpu"``, ``"gpu(0)"``, ``"cuda:0"``."""

    @abstractmethod
    def __init__(self, package: Package, device: str, threads: int | None) -> None:
        """Load ``package`` on ``device``; ``threads`` caps intra-op threads (None: the
        framework's default).  Raises :class:`~lensbus.errors.ModelLoadError`."""

    def build(self) -> None:  # noqa: B027 - optional: most frameworks build while loading
        """Compile what the framework compiles before the first run (a graph pass, kernels).
        Separate from loading because it computes: a live swap runs it between two served
        frames (in a frame's turn), not beside one.  ``forward`` builds first if not built.
        Raises :class:`~lensbus.errors.ModelLoadError`."""

    @abstractmethod
    def forward(self, tensor: Array) -> list[Array]:
        """The model's outputs for one input tensor, in the model's output order."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the model (and the device memory it holds)."""


BACKENDS: dict[str, type[Backend]] = {}
"""``framework`` key -> backend class; filled by :func:`register`."""

B = TypeVar("B", bound=type[Backend])


def register(cls: B) -> B:
    """Class decorator: add a backend to :data:`BACKENDS` under its ``framework``."""
    key = cls.framework
    if key in BACKENDS and BACKENDS[key] is not cls:
        raise ValueError(f"framework {key!r} is already registered to {BACKENDS[key].__name__}")
    if cls.main_role not in cls.roles:
        raise ValueError(f"{cls.__name__}: main_role {cls.main_role!r} is not one of its roles")
    BACKENDS[key] = cls
    return cls


def unregister(framework: str) -> None:
    """Remove a backend from :data:`BACKENDS` (a test's, or one being replaced)."""
    BACKENDS.pop(framework, None)


class DeviceError(ModelLoadError, ValueError):
    """A device string that names no device (a ``ValueError`` too, for settings)."""


_DEVICE = re.compile(r"^(cpu|gpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ``("cpu", 0)``, ``"gpu:1"`` / ``"cuda:1"`` -> ``("gpu", 1)``."""
    m = _DEVICE.match(device.strip().lower())
    if not m:
        raise DeviceError(f"device {device!r} is not one of cpu, gpu, gpu:N (or cuda, cuda:N)")
    kind = "cpu" if m.group(1) == "cpu" else "gpu"
    if kind == "cpu" and m.group(2) not in (None, "0"):
        raise DeviceError(f"device {device!r}: there is only one CPU device, use 'cpu'")
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


def short_error(exc: BaseException) -> str:
    """The useful part of an exception: MXNet and OpenCV wrap it in source locations."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # MXNet: "Traceback ...", "File "../src/x.cc", line N", "MXNetError: Check failed: ..."
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "Stack trace"))]
    text = " ".join(ln.lstrip("> ") for ln in lines)
    # OpenCV: "OpenCV(4.11.0) /io/opencv/modules/.../x.cpp:106: error: (-5:Bad argument) ..."
    text = re.sub(r"OpenCV\([\d.]+\) \S+:\d+: error: ", "", text)
    return text[:400] or type(exc).__name__


def import_framework(package: Package, module: str, install: str) -> Any:
    """``module`` imported, or a :class:`ModelLoadError` saying what to install.

    A package may name a framework this environment does not carry (MXNet lives only in an
    environment of its own, Python 3.11 with numpy<1.24): loading it then fails with the
    package, the missing module and ``install``, not with a bare ImportError.
    """
    ref, framework = package.manifest.ref, package.manifest.framework
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0]:  # the framework is there, a module it needs is not
            raise ModelLoadError(
                f"{ref}: {module} is installed but cannot be imported ({short_error(exc)}); "
                f"reinstall it with {install}"
            ) from None
        raise ModelLoadError(
            f"{ref}: framework {framework!r} needs {module}, which is not installed in this "
            f"environment ({sys.executable}); install {install}"
        ) from None
    except Exception as exc:  # e.g. MXNet 1.9 beside numpy>=1.24: AttributeError on np.bool
        raise ModelLoadError(
            f"{ref}: {module} is installed but fails to import here ({short_error(exc)}); "
            f"it needs the environment {install} makes"
        ) from None
