"""Decoders, one per way of reading a model's outputs, collected in :data:`DECODERS` by key.

Adding a decoder is one module: subclass :class:`Decoder`, set ``key`` and ``tasks``, give it
an ``Options`` model (a :class:`DecoderOptions` with ``decoder: Literal["<key>"] = "<key>"``
and its options, each with a default and a description), decorate it with :func:`register`.
Every module of this package is imported with it (below), so the new one registers itself in
every process that reads manifests: the deployer and inference alike.  The manifest
validates ``decoder_options`` with that model, so a bad option is refused wherever a manifest
is read (the deployer's upload included), and ``docs/schemas/manifest.json`` documents it.
"""

import importlib
import pkgutil

from lensbus.decoders.base import (
    DECODERS,
    DecodedOutputs,
    Decoder,
    DecoderOptions,
    decoder_for,
    nms,
    register,
    unregister,
)
from lensbus.decoders.classification import ClassificationDecoder, ClassificationOptions
from lensbus.decoders.segmentation import SegmentationDecoder, SegmentationOptions
from lensbus.decoders.ssd import SSDDecoder, SSDOptions
from lensbus.decoders.yolo import YoloDecoder, YoloOptions, decode_yolo_grid

__all__ = [
    "DECODERS",
    "ClassificationDecoder",
    "ClassificationOptions",
    "DecodedOutputs",
    "Decoder",
    "DecoderOptions",
    "SSDDecoder",
    "SSDOptions",
    "SegmentationDecoder",
    "SegmentationOptions",
    "YoloDecoder",
    "YoloOptions",
    "decode_yolo_grid",
    "decoder_for",
    "nms",
    "register",
    "unregister",
]

# Importing a decoder's module registers it: import every one, the built-ins above included.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
