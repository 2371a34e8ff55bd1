"""A darknet cfg + weights as a plan of layers that every target builds its network from.

The plan holds everything a framework needs and nothing framework-specific: each layer's
options and output shape, the convolutions' weights with batch norm folded in, the yolo
layers' decoding constants.  Plain numpy: planning needs no MXNet and no torch.  The
targets (:mod:`.darknet` for MXNet, :mod:`.darknet_onnx`, :mod:`.darknet_torch`) each turn
a plan into their network, and all follow one output convention (identical to
``cv2.dnn.readNetFromDarknet``, verified on the real yolov3-tiny; see
``tests/test_darknet_import.py``):

* input: ``(1, 3, H, W)`` float32, RGB, pixels / 255, image *stretched* (not letterboxed) to
  the cfg's ``width`` x ``height``;
* output: every ``[yolo]`` layer decoded in the graph and concatenated along axis 1, giving
  ``(1, total_boxes, 5 + classes)``.  Each row is
  ``[cx, cy, w, h, objectness, class_0 ... class_{C-1}]``, with the box normalised to 0..1 of
  the network input.  Within one yolo layer the rows are ordered by ``(grid_y, grid_x, anchor)``;
* class columns hold ``objectness * sigmoid(class_logit)`` (already multiplied by
  objectness, as OpenCV's region layer does), and values ``<= thresh`` are set to exactly 0.
  ``thresh`` is the ``[yolo]`` section's ``thresh`` key, default 0.2, which is OpenCV's
  default too.  So the detection score of a class is the class column itself; do not multiply
  by objectness again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lensbus_inference.packaging.darknet_cfg import (
    FloatArray,
    Section,
    WeightsHeader,
    float_option,
    int_list,
    int_option,
    parse_cfg,
    read_weights,
)

# Batch-norm epsilon, added to the running variance.  OpenCV's darknet importer uses 1e-6
# (measured: max diff vs OpenCV on yolov3-tiny ~6e-6 with 1e-6, ~1e-4 with 1e-5).  Darknet
# itself differs by fork (pjreddie: std + 1e-6, AlexeyAB: var + 1e-5); all agree to ~1e-4.
BN_EPS = 1e-6
# Darknet's "leaky" activation slope.
LEAKY_SLOPE = 0.1
# OpenCV's region layer zeroes class probabilities at or below this unless the cfg says otherwise.
DEFAULT_CLASS_THRESH = 0.2
ACTIVATIONS = ("leaky", "linear", "relu", "logistic")

Shape = tuple[int, int, int]  # (channels, height, width) of one layer's output


@dataclass
class Conv:
    """[convolutional]: conv (+ batch norm, folded into ``kernel``/``bias``) + activation."""

    in_channels: int
    filters: int
    size: int
    stride: int
    pad: int
    groups: int
    batch_normalize: bool
    activation: str
    out_shape: Shape
    # (filters, in_channels // groups, size, size) and (filters,), float32; None until loaded
    kernel: FloatArray | None = None
    bias: FloatArray | None = None

    @property
    def weight_count(self) -> int:
        kernel = self.filters * (self.in_channels // self.groups) * self.size * self.size
        # BN stores beta, gamma, mean, var per filter; otherwise just the conv bias.
        return kernel + self.filters * (4 if self.batch_normalize else 1)


@dataclass
class MaxPool:
    """[maxpool] with darknet's padding: ``pad`` on every side, then ``extra_h``/``extra_w``
    more at the bottom/right where darknet's (asymmetric) padding needs it."""

    size: int
    stride: int
    pad: int
    extra_h: int
    extra_w: int
    out_shape: Shape


@dataclass
class Upsample:
    """[upsample]: nearest neighbour by an integer ``stride``."""

    stride: int
    out_shape: Shape


@dataclass
class Route:
    """[route]: the outputs of earlier layers concatenated along channels, then (yolov4-tiny
    ``groups``/``group_id``) one channel slice of it: ``[begin, begin + out_shape[0])``."""

    sources: list[int]
    groups: int
    group_id: int
    out_shape: Shape

    @property
    def begin(self) -> int:
        return self.group_id * self.out_shape[0]


@dataclass
class Shortcut:
    """[shortcut]: the previous layer's output plus layer ``source``'s."""

    source: int
    out_shape: Shape


@dataclass
class Yolo:
    """[yolo]: the raw conv output decoded to rows ``[cx, cy, w, h, obj, classes...]``.

    ``grid`` (1, rows, 2) holds each row's cell (x, y), ``anchor_wh`` (1, rows, 2) its anchor
    size normalised to the network input and ``inv_grid`` (1, 1, 2) is 1 / grid size:
    constants, as the input size is fixed by the cfg.  Rows are ordered by
    ``(grid_y, grid_x, anchor)``, the order OpenCV emits.
    """

    classes: int
    num_anchors: int
    scale_x_y: float
    thresh: float
    grid: FloatArray
    inv_grid: FloatArray
    anchor_wh: FloatArray
    rows: int
    out_shape: Shape


Layer = Conv | MaxPool | Upsample | Route | Shortcut | Yolo


def _resolve(index: int, current: int) -> int:
    """Darknet layer references: negative is relative to the current layer, else absolute."""
    absolute = current + index if index < 0 else index
    if not 0 <= absolute < current:
        raise ValueError(f"layer {current} refers to layer {index}, which is not before it")
    return absolute


def _conv(sec: Section, in_shape: Shape) -> Conv:
    c, h, w = in_shape
    size = int_option(sec, "size", 1)
    stride = int_option(sec, "stride", 1)
    groups = int_option(sec, "groups", 1)
    # darknet: "pad=1" means same-ish padding (size // 2) and overrides "padding"
    pad = size // 2 if int_option(sec, "pad", 0) else int_option(sec, "padding", 0)
    filters = int_option(sec, "filters", 1)
    activation = sec.get("activation", "logistic")
    if activation not in ACTIVATIONS:
        raise NotImplementedError(f"[convolutional] activation={activation}")
    if c % groups or filters % groups:
        raise ValueError(f"[convolutional] groups={groups} does not divide channels")
    out = (filters, (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1)
    bn = bool(int_option(sec, "batch_normalize", 0))
    return Conv(c, filters, size, stride, pad, groups, bn, activation, out)


def _maxpool(sec: Section, in_shape: Shape) -> MaxPool:
    """Darknet pads ``size - 1`` in total, ``padding // 2`` before and the rest after, and
    ignores out-of-bounds pixels: size=2 stride=1 keeps the size, size=2 stride=2 on an odd
    size rounds up.  Only the padding the last window needs is kept (see ``MaxPool``)."""
    c, h, w = in_shape
    size = int_option(sec, "size", 1)
    stride = int_option(sec, "stride", 1)
    padding = int_option(sec, "padding", size - 1)
    if padding > size - 1:
        raise NotImplementedError("[maxpool] padding larger than size - 1")
    pad = padding // 2
    out_h = (h + padding - size) // stride + 1
    out_w = (w + padding - size) // stride + 1
    extra_h = max(0, (out_h - 1) * stride + size - (h + 2 * pad))
    extra_w = max(0, (out_w - 1) * stride + size - (w + 2 * pad))
    return MaxPool(size, stride, pad, extra_h, extra_w, (c, out_h, out_w))


def _upsample(sec: Section, in_shape: Shape) -> Upsample:
    stride = int_option(sec, "stride", 2)
    if stride < 1 or float_option(sec, "scale", 1.0) != 1.0:
        raise NotImplementedError("[upsample] with negative stride or scale != 1")
    c, h, w = in_shape
    return Upsample(stride, (c, h * stride, w * stride))


def _route(sec: Section, index: int, shapes: list[Shape]) -> Route:
    sources = [_resolve(i, index) for i in int_list(sec, "layers")]
    groups = int_option(sec, "groups", 1)
    src = [shapes[i] for i in sources]
    if any(s[1:] != src[0][1:] for s in src):
        raise ValueError(f"[route] at layer {index}: inputs differ in spatial size {src}")
    channels = sum(s[0] for s in src) // groups
    out = (channels, src[0][1], src[0][2])
    return Route(sources, groups, int_option(sec, "group_id", 0), out)


def _shortcut(sec: Section, index: int, shapes: list[Shape]) -> Shortcut:
    source = _resolve(int_option(sec, "from"), index)
    if sec.get("activation", "linear") != "linear":
        raise NotImplementedError("[shortcut] with a non-linear activation")
    if shapes[source] != shapes[index - 1]:
        raise NotImplementedError("[shortcut] between layers of different shapes")
    return Shortcut(source, shapes[index - 1])


def plan_yolo(sec: Section, in_shape: Shape, net_hw: tuple[int, int]) -> Yolo:
    """One [yolo] section as a plan layer (public: the yolo decoder's tests compare with it)."""
    c, grid_h, grid_w = in_shape
    classes = int_option(sec, "classes", 20)
    anchors = np.array(int_list(sec, "anchors"), dtype=np.float64).reshape(-1, 2)
    mask = int_list(sec, "mask") if "mask" in sec else list(range(len(anchors)))
    num_anchors = len(mask)
    if c != num_anchors * (5 + classes):
        raise ValueError(f"[yolo] expects {num_anchors} x (5 + {classes}) channels, got {c}")
    if int_option(sec, "new_coords", 0):
        raise NotImplementedError("[yolo] new_coords=1 (scaled-YOLOv4 decoding)")
    if float_option(sec, "nms_threshold", 0.0) > 0:
        # OpenCV would run NMS inside the layer and zero suppressed rows; we leave NMS to
        # the post-processing rather than silently produce a different output.
        raise NotImplementedError("[yolo] nms_threshold > 0 (in-layer NMS)")
    net_h, net_w = net_hw
    gy, gx, a = np.meshgrid(
        np.arange(grid_h), np.arange(grid_w), np.arange(num_anchors), indexing="ij"
    )
    grid = np.stack([gx.ravel(), gy.ravel()], axis=-1)[None]
    inv_grid = np.array([1.0 / grid_w, 1.0 / grid_h]).reshape(1, 1, 2)
    anchor_wh = (anchors[mask][a.ravel()] / np.array([net_w, net_h]))[None]
    rows = grid_h * grid_w * num_anchors
    f32 = np.float32
    return Yolo(
        classes,
        num_anchors,
        float_option(sec, "scale_x_y", 1.0),
        float_option(sec, "thresh", DEFAULT_CLASS_THRESH),
        grid.astype(f32),
        inv_grid.astype(f32),
        anchor_wh.astype(f32),
        rows,
        (1, rows, 5 + classes),
    )


def _layer(kind: str, sec: Section, i: int, shapes: list[Shape], net: Shape) -> Layer:
    prev = shapes[-1] if shapes else net
    if kind in ("convolutional", "conv"):
        return _conv(sec, prev)
    if kind in ("maxpool", "max"):
        return _maxpool(sec, prev)
    if kind == "upsample":
        return _upsample(sec, prev)
    if kind == "route":
        return _route(sec, i, shapes)
    if kind == "shortcut":
        return _shortcut(sec, i, shapes)
    if kind == "yolo":
        return plan_yolo(sec, prev, net[1:])
    raise NotImplementedError(f"darknet layer [{kind}] (layer {i})")


@dataclass
class Plan:
    """A darknet network, layer by layer: ``(1, channels, height, width)`` ->
    ``(1, total_boxes, 5 + classes)``."""

    channels: int
    height: int
    width: int
    layers: list[Layer]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, self.height, self.width)

    @property
    def yolo_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, Yolo)]

    @property
    def classes(self) -> int:
        return next(lay.classes for lay in self.layers if isinstance(lay, Yolo))

    @property
    def total_boxes(self) -> int:
        return sum(lay.rows for lay in self.layers if isinstance(lay, Yolo))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (1, self.total_boxes, 5 + self.classes)

    @property
    def convs(self) -> list[Conv]:
        return [lay for lay in self.layers if isinstance(lay, Conv)]

    @property
    def weight_count(self) -> int:
        """Number of floats the matching ``.weights`` file must hold (after the header)."""
        return sum(conv.weight_count for conv in self.convs)

    @property
    def loaded(self) -> bool:
        return all(conv.kernel is not None for conv in self.convs)

    def load_weights(self, path: str | Path) -> WeightsHeader:
        """Every conv's kernel and bias from a darknet weights file, BN folded in."""
        header, flat = read_weights(path, expected_count=self.weight_count)
        pos = 0
        for conv in self.convs:
            pos = _load_conv(conv, flat, pos)
        assert pos == flat.size  # guaranteed by the expected_count check
        return header


def _load_conv(conv: Conv, flat: FloatArray, pos: int) -> int:
    """Take ``conv``'s weights from ``flat`` starting at ``pos``; return the new position."""
    n = conv.filters
    per_filter = 4 if conv.batch_normalize else 1
    # darknet order: the per-filter floats (beta, gamma, running mean, running var with BN,
    # else the bias), then the kernel
    head = flat[pos : pos + n * per_filter].astype(np.float64).reshape(per_filter, n)
    kernel = flat[pos + n * per_filter : pos + conv.weight_count]
    kernel = kernel.reshape(n, conv.in_channels // conv.groups, conv.size, conv.size)
    bias = head[0]
    if conv.batch_normalize:
        # Fold BN into the conv: gamma * (conv(x) - mean) / sqrt(var + eps) + beta
        # == conv_with(kernel * s)(x) + (beta - mean * s), s = gamma / sqrt(var + eps).
        # One op instead of two at inference, and nothing BN-specific for a target to build.
        beta, gamma, mean, var = head
        scale = gamma / np.sqrt(var + BN_EPS)
        kernel = kernel * scale[:, None, None, None]
        bias = beta - mean * scale
    conv.kernel = np.array(kernel, dtype=np.float32)  # a copy: `flat` is read-only
    conv.bias = bias.astype(np.float32)
    return pos + conv.weight_count


def plan_darknet(cfg: str | Path, weights: str | Path | None = None) -> Plan:
    """The plan of ``cfg``, with ``weights`` loaded when given.

    Supported layers are the ones YOLOv3 and YOLOv3-tiny need: ``[convolutional]``,
    ``[maxpool]``, ``[upsample]``, ``[route]``, ``[shortcut]`` and ``[yolo]``.  Anything else
    raises ``NotImplementedError`` instead of silently building a different network.
    """
    sections = parse_cfg(cfg)
    net = sections[0]
    in_shape: Shape = (
        int_option(net, "channels", 3),
        int_option(net, "height", 416),
        int_option(net, "width", 416),
    )
    layers: list[Layer] = []
    shapes: list[Shape] = []
    for i, sec in enumerate(sections[1:]):
        layers.append(_layer(sec["type"], sec, i, shapes, in_shape))
        shapes.append(layers[-1].out_shape)
    plan = Plan(*in_shape, layers)
    yolos = [lay for lay in layers if isinstance(lay, Yolo)]
    if not yolos:
        raise ValueError("the cfg has no [yolo] layer, so the network would have no output")
    if len({y.classes for y in yolos}) != 1:
        raise ValueError("all [yolo] layers must have the same number of classes")
    if weights is not None:
        plan.load_weights(weights)
    return plan
