"""Backends, one per framework, collected in :data:`BACKENDS` by their ``framework`` key.

Adding a framework is one module: subclass :class:`Backend`, set ``framework``, ``roles``
and ``main_role``, decorate it with :func:`register`.  Every module of this package
is imported with it (below), so the new one registers itself in every process that reads
manifests.  The
frameworks themselves (MXNet, onnxruntime, OpenCV) are imported when a model loads, so
validating a manifest does not load them.
"""

import importlib
import pkgutil

from lensbus.backends.base import (
    BACKENDS,
    Array,
    Backend,
    DeviceError,
    import_framework,
    input_shape,
    parse_device,
    register,
    short_error,
    unregister,
    where,
)

__all__ = [
    "BACKENDS",
    "Array",
    "Backend",
    "DeviceError",
    "import_framework",
    "input_shape",
    "parse_device",
    "register",
    "short_error",
    "unregister",
    "where",
]

# Importing a backend's module registers it: import every one.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
