"""Backends, one per framework, collected in :data:`BACKENDS` by their ``framework`` key.

Adding a framework is one module: subclass :class:`Backend`, set ``framework``, ``roles``
and ``main_role``, decorate it with :func:`register`, and import the module here.  The
frameworks themselves (MXNet, onnxruntime, OpenCV) are imported when a model loads, so
validating a manifest does not load them.
"""

from lensbus.backends import mxnet, onnx, opencv  # noqa: F401  (they register themselves)
from lensbus.backends.base import (
    BACKENDS,
    Array,
    Backend,
    DeviceError,
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
    "input_shape",
    "parse_device",
    "register",
    "short_error",
    "unregister",
    "where",
]
