"""Darknet (``.cfg`` + ``.weights``) to an MXNet Gluon network, exported to MXNet and ONNX files.

The files are read by :mod:`~lensbus_inference.packaging.darknet_cfg`, the layers are in
:mod:`~lensbus_inference.packaging.darknet_layers`.

Supported layers are the ones YOLOv3 and YOLOv3-tiny need: ``[convolutional]``, ``[maxpool]``,
``[upsample]``, ``[route]``, ``[shortcut]`` and ``[yolo]``.  Anything else raises
``NotImplementedError`` instead of silently building a different network.

Output convention (identical to ``cv2.dnn.readNetFromDarknet``, verified on the real
yolov3-tiny; see ``tests/test_darknet_import.py``):

* input: ``(N, 3, H, W)`` float32, RGB, pixels / 255, image *stretched* (not letterboxed) to
  the cfg's ``width`` x ``height``;
* output: every ``[yolo]`` layer decoded in the graph and concatenated along axis 1, giving
  ``(N, total_boxes, 5 + classes)``.  Each row is
  ``[cx, cy, w, h, objectness, class_0 ... class_{C-1}]``, with the box normalised to 0..1 of
  the network input.  Within one yolo layer the rows are ordered by ``(grid_y, grid_x, anchor)``;
* class columns hold ``objectness * sigmoid(class_logit)`` (already multiplied by
  objectness, as OpenCV's region layer does), and values ``<= thresh`` are set to exactly 0.
  ``thresh`` is the ``[yolo]`` section's ``thresh`` key, default 0.2, which is OpenCV's
  default too.  So the detection score of a class is the class column itself; do not multiply
  by objectness again.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from lensbus.backends.onnx import strip_initializer_inputs
from lensbus_inference.packaging.darknet_cfg import (
    Section,
    WeightsHeader,
    int_option,
    parse_cfg,
    read_weights,
)
from lensbus_inference.packaging.darknet_layers import (
    DarknetConv,
    DarknetMaxPool,
    DarknetRoute,
    DarknetShortcut,
    DarknetUpsample,
    DarknetYolo,
    Shape,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------


class DarknetNet(HybridBlock):
    """A darknet cfg as a Gluon HybridBlock: ``(N, 3, H, W)`` -> ``(N, boxes, 5 + classes)``."""

    def __init__(self, sections: list[Section], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        net, layer_sections = sections[0], sections[1:]
        self.height = int_option(net, "height", 416)
        self.width = int_option(net, "width", 416)
        self.channels = int_option(net, "channels", 3)
        self.classes = 0
        # Output shape of every layer so far, to size convs and the yolo constants up front.
        shapes: list[Shape] = []
        in_shape: Shape = (self.channels, self.height, self.width)
        # A HybridSequential used only as a container (registers the children); the forward
        # pass below wires them up itself because routes and shortcuts are not sequential.
        self.layers = nn.HybridSequential(prefix="")
        self._yolo_indices: list[int] = []
        with self.name_scope():
            for i, sec in enumerate(layer_sections):
                kind = sec["type"]
                prev = shapes[-1] if shapes else in_shape
                layer: HybridBlock
                if kind in ("convolutional", "conv"):
                    layer = DarknetConv(sec, prev, prefix=f"conv{i}_")
                elif kind in ("maxpool", "max"):
                    layer = DarknetMaxPool(sec, prev, prefix=f"maxpool{i}_")
                elif kind == "upsample":
                    layer = DarknetUpsample(sec, prev, prefix=f"upsample{i}_")
                elif kind == "route":
                    layer = DarknetRoute(sec, i, shapes, prefix=f"route{i}_")
                elif kind == "shortcut":
                    layer = DarknetShortcut(sec, i, shapes, prefix=f"shortcut{i}_")
                elif kind == "yolo":
                    layer = DarknetYolo(sec, prev, (self.height, self.width), prefix=f"yolo{i}_")
                    self.classes = max(self.classes, layer.classes)
                    self._yolo_indices.append(i)
                else:
                    raise NotImplementedError(f"darknet layer [{kind}] (layer {i})")
                self.layers.add(layer)
                shapes.append(layer.out_shape)
        if not self._yolo_indices:
            raise ValueError("the cfg has no [yolo] layer, so the network would have no output")
        if len({self.layers[i].classes for i in self._yolo_indices}) != 1:
            raise ValueError("all [yolo] layers must have the same number of classes")
        self.total_boxes = sum(self.layers[i].rows for i in self._yolo_indices)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, self.height, self.width)

    @property
    def weight_count(self) -> int:
        """Number of floats the matching ``.weights`` file must hold (after the header)."""
        return sum(lay.weight_count for lay in self.layers if isinstance(lay, DarknetConv))

    def load_darknet_weights(self, path: str | Path) -> WeightsHeader:
        """Initialise all parameters from a darknet weights file (BN folded into the convs)."""
        self.initialize(mx.init.Zero(), force_reinit=True)
        header, flat = read_weights(path, expected_count=self.weight_count)
        pos = 0
        for layer in self.layers:
            if isinstance(layer, DarknetConv):
                pos = layer.load(flat, pos)
        assert pos == flat.size  # guaranteed by the expected_count check
        return header

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        outputs: list[Any] = []
        for layer in self.layers:
            if isinstance(layer, DarknetRoute):
                x = layer(*[outputs[i] for i in layer.sources])
            elif isinstance(layer, DarknetShortcut):
                x = layer(outputs[-1], outputs[layer.source])
            else:
                x = layer(x)
            outputs.append(x)
        yolo = [outputs[i] for i in self._yolo_indices]
        return yolo[0] if len(yolo) == 1 else F.concat(*yolo, dim=1)


def build_darknet(cfg: str | Path, weights: str | Path | None = None) -> DarknetNet:
    """Build the Gluon network for ``cfg`` and, if given, load ``weights`` into it."""
    net = DarknetNet(parse_cfg(cfg), prefix="darknet_")
    if weights is not None:
        net.load_darknet_weights(weights)
    else:
        net.initialize(mx.init.Xavier())
    return net


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def import_darknet(
    cfg: str | Path,
    weights: str | Path,
    out_dir: str | Path,
    prefix: str = "yolov3-tiny",
) -> dict[str, str]:
    """Convert darknet ``cfg`` + ``weights`` to MXNet and ONNX files in ``out_dir``.

    Writes ``<prefix>-symbol.json`` and ``<prefix>-0000.params`` (load them with
    ``mx.gluon.SymbolBlock.imports(symbol, ["data"], params)``) and ``<prefix>.onnx`` (input
    ``data``, fixed shape (1, 3, height, width)).  Returns
    ``{"symbol": ..., "params": ..., "onnx": ...}``.
    """
    import onnx
    from mxnet import onnx as mx_onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = build_darknet(cfg, weights)
    net.hybridize(static_alloc=True, static_shape=True)
    # One forward builds the cached graph, which export() serialises.
    y = net(mx.nd.zeros(net.input_shape))
    expected = (1, net.total_boxes, 5 + net.classes)
    if y.shape != expected:
        raise RuntimeError(f"network output {y.shape}, expected {expected}")
    stem = str(out / prefix)
    net.export(stem, epoch=0)
    paths = {
        "symbol": f"{stem}-symbol.json",
        "params": f"{stem}-0000.params",
        "onnx": f"{stem}.onnx",
    }

    # Convert from the exported files, so the ONNX model is exactly what was written above.
    with warnings.catch_warnings():
        # mxnet 1.9's exporter uses onnx.mapping, deprecated in onnx >= 1.14: noise, not ours.
        warnings.simplefilter("ignore", DeprecationWarning)
        mx_onnx.export_model(
            paths["symbol"],
            paths["params"],
            in_shapes=[net.input_shape],
            in_types=[np.float32],
            onnx_file_path=paths["onnx"],
        )
    model = onnx.load(paths["onnx"])
    strip_initializer_inputs(model)
    onnx.checker.check_model(model)
    onnx.save(model, paths["onnx"])
    log.info("darknet %s -> %s", cfg, paths)
    return paths
