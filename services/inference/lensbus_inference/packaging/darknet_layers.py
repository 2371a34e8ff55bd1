"""The darknet layers as MXNet Gluon blocks, each reproducing what darknet (and OpenCV's
darknet reader) computes; :class:`~lensbus_inference.packaging.darknet.DarknetNet` wires them.
"""

from __future__ import annotations

import warnings
from typing import Any

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from lensbus_inference.packaging.darknet_cfg import (
    FloatArray,
    Section,
    float_option,
    int_list,
    int_option,
)

# Batch-norm epsilon, added to the running variance.  OpenCV's darknet importer uses 1e-6
# (measured: max diff vs OpenCV on yolov3-tiny ~6e-6 with 1e-6, ~1e-4 with 1e-5).  Darknet
# itself differs by fork (pjreddie: std + 1e-6, AlexeyAB: var + 1e-5); all agree to ~1e-4.
BN_EPS = 1e-6
# Darknet's "leaky" activation slope.
LEAKY_SLOPE = 0.1
# OpenCV's region layer zeroes class probabilities at or below this unless the cfg says otherwise.
DEFAULT_CLASS_THRESH = 0.2

Shape = tuple[int, int, int]  # (channels, height, width) of one layer's output


class DarknetConv(HybridBlock):
    """[convolutional]: conv (+ batch norm folded into it at load time) + activation."""

    def __init__(self, section: Section, in_shape: Shape, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c, h, w = in_shape
        self.filters = int_option(section, "filters", 1)
        self.size = int_option(section, "size", 1)
        self.stride = int_option(section, "stride", 1)
        self.groups = int_option(section, "groups", 1)
        # darknet: "pad=1" means same-ish padding (size // 2) and overrides "padding"
        self.pad = (
            self.size // 2 if int_option(section, "pad", 0) else int_option(section, "padding", 0)
        )
        self.batch_normalize = bool(int_option(section, "batch_normalize", 0))
        self.activation = section.get("activation", "logistic")
        if self.activation not in ("leaky", "linear", "relu", "logistic"):
            raise NotImplementedError(f"[convolutional] activation={self.activation}")
        if c % self.groups or self.filters % self.groups:
            raise ValueError(f"[convolutional] groups={self.groups} does not divide channels")
        self.in_channels = c
        with self.name_scope():
            # Always with a bias: with batch_normalize the folded BN becomes that bias.
            self.conv = nn.Conv2D(
                self.filters,
                self.size,
                strides=self.stride,
                padding=self.pad,
                groups=self.groups,
                use_bias=True,
                in_channels=c,
            )
        self.out_shape: Shape = (
            self.filters,
            (h + 2 * self.pad - self.size) // self.stride + 1,
            (w + 2 * self.pad - self.size) // self.stride + 1,
        )

    @property
    def weight_count(self) -> int:
        kernel = self.filters * (self.in_channels // self.groups) * self.size * self.size
        # BN stores beta, gamma, mean, var per filter; otherwise just the conv bias.
        return kernel + self.filters * (4 if self.batch_normalize else 1)

    def load(self, flat: FloatArray, pos: int) -> int:
        """Take this layer's weights from ``flat`` starting at ``pos``; return the new position."""
        n = self.filters

        def take(count: int) -> FloatArray:
            nonlocal pos
            chunk = flat[pos : pos + count]
            pos += count
            return chunk

        if self.batch_normalize:
            # darknet order: beta (the "biases"), gamma (the "scales"), running mean, running var
            beta, gamma, mean, var = (take(n).astype(np.float64) for _ in range(4))
        else:
            bias = take(n).astype(np.float64)
        kernel = take(self.weight_count - n * (4 if self.batch_normalize else 1))
        kernel = kernel.reshape(n, self.in_channels // self.groups, self.size, self.size)
        if self.batch_normalize:
            # Fold BN into the conv: gamma * (conv(x) - mean) / sqrt(var + eps) + beta
            # == conv_with(kernel * s)(x) + (beta - mean * s), s = gamma / sqrt(var + eps).
            # One op instead of two at inference, and nothing BN-specific to export.
            scale = gamma / np.sqrt(var + BN_EPS)
            kernel = kernel * scale[:, None, None, None]
            bias = beta - mean * scale
        self.conv.weight.set_data(mx.nd.array(kernel.astype(np.float32)))
        self.conv.bias.set_data(mx.nd.array(bias.astype(np.float32)))
        return pos

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.conv(x)
        if self.activation == "leaky":
            return F.LeakyReLU(x, act_type="leaky", slope=LEAKY_SLOPE)
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "logistic":
            return F.sigmoid(x)
        return x


class DarknetMaxPool(HybridBlock):
    """[maxpool], reproducing darknet's padding.

    Darknet pads ``size - 1`` in total, ``padding // 2`` before and the rest after, and simply
    ignores out-of-bounds pixels.  So size=2 stride=1 (yolov3-tiny's 6th pool) pads one pixel
    right/bottom and keeps the spatial size, and size=2 stride=2 on an odd size rounds up.
    MXNet/ONNX pooling only pads symmetrically, so: pool with the "before" padding on both
    sides, plus an explicit right/bottom Pad only where darknet's output needs more.  Pad
    replicates the edge, which for a max is exact: every window that touches a padded pixel
    also holds the border pixel it copies.

    Padding only what is needed matters for speed: padding a 416x416 map to 417x417 for a
    2x2/2 pool whose windows never reach the padding made MXNet's pooling ~5x slower.
    """

    def __init__(self, section: Section, in_shape: Shape, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c, h, w = in_shape
        self.size = int_option(section, "size", 1)
        self.stride = int_option(section, "stride", 1)
        padding = int_option(section, "padding", self.size - 1)
        if padding > self.size - 1:
            raise NotImplementedError("[maxpool] padding larger than size - 1")
        self.pad = padding // 2
        out_h = (h + padding - self.size) // self.stride + 1
        out_w = (w + padding - self.size) // self.stride + 1
        # Extra right/bottom pixels the last window needs beyond the symmetric padding.
        self.extra_h = max(0, (out_h - 1) * self.stride + self.size - (h + 2 * self.pad))
        self.extra_w = max(0, (out_w - 1) * self.stride + self.size - (w + 2 * self.pad))
        self.out_shape: Shape = (c, out_h, out_w)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        if self.extra_h or self.extra_w:
            x = F.pad(x, mode="edge", pad_width=(0, 0, 0, 0, 0, self.extra_h, 0, self.extra_w))
        return F.Pooling(
            x,
            kernel=(self.size, self.size),
            stride=(self.stride, self.stride),
            pad=(self.pad, self.pad),
            pool_type="max",
        )


class DarknetUpsample(HybridBlock):
    """[upsample]: nearest-neighbour, integer stride (exports to ONNX Resize nearest)."""

    def __init__(self, section: Section, in_shape: Shape, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stride = int_option(section, "stride", 2)
        if self.stride < 1 or float_option(section, "scale", 1.0) != 1.0:
            raise NotImplementedError("[upsample] with negative stride or scale != 1")
        c, h, w = in_shape
        self.out_shape: Shape = (c, h * self.stride, w * self.stride)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.UpSampling(x, scale=self.stride, sample_type="nearest")


def _resolve(index: int, current: int) -> int:
    """Darknet layer references: negative is relative to the current layer, else absolute."""
    absolute = current + index if index < 0 else index
    if not 0 <= absolute < current:
        raise ValueError(f"layer {current} refers to layer {index}, which is not before it")
    return absolute


class DarknetRoute(HybridBlock):
    """[route]: concatenate (along channels) the outputs of earlier layers."""

    def __init__(self, section: Section, index: int, shapes: list[Shape], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sources = [_resolve(i, index) for i in int_list(section, "layers")]
        # yolov4-tiny style "groups/group_id": take one channel slice of the (single) input
        self.groups = int_option(section, "groups", 1)
        self.group_id = int_option(section, "group_id", 0)
        src = [shapes[i] for i in self.sources]
        if any(s[1:] != src[0][1:] for s in src):
            raise ValueError(f"[route] at layer {index}: inputs differ in spatial size {src}")
        channels = sum(s[0] for s in src) // self.groups
        self.out_shape: Shape = (channels, src[0][1], src[0][2])

    def hybrid_forward(self, F: Any, *inputs: Any) -> Any:
        x = inputs[0] if len(inputs) == 1 else F.concat(*inputs, dim=1)
        if self.groups > 1:
            c = self.out_shape[0]
            x = F.slice_axis(x, axis=1, begin=self.group_id * c, end=(self.group_id + 1) * c)
        return x


class DarknetShortcut(HybridBlock):
    """[shortcut]: residual add of the previous layer and layer ``from``."""

    def __init__(self, section: Section, index: int, shapes: list[Shape], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = _resolve(int_option(section, "from"), index)
        if section.get("activation", "linear") != "linear":
            raise NotImplementedError("[shortcut] with a non-linear activation")
        if shapes[self.source] != shapes[index - 1]:
            raise NotImplementedError("[shortcut] between layers of different shapes")
        self.out_shape: Shape = shapes[index - 1]

    def hybrid_forward(self, F: Any, previous: Any, other: Any) -> Any:
        return previous + other


class DarknetYolo(HybridBlock):
    """[yolo]: decode the raw conv output to OpenCV's row layout (see
    :mod:`lensbus_inference.packaging.darknet`).

    The grid offsets and per-row anchor sizes are precomputed constants of shape
    (1, rows, 2): the input size is fixed by the cfg, and constants are simpler to export than
    arange/tile gymnastics in the graph.
    """

    def __init__(
        self, section: Section, in_shape: Shape, net_hw: tuple[int, int], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        c, grid_h, grid_w = in_shape
        self.classes = int_option(section, "classes", 20)
        anchors = np.array(int_list(section, "anchors"), dtype=np.float64).reshape(-1, 2)
        mask = int_list(section, "mask") if "mask" in section else list(range(len(anchors)))
        self.num_anchors = len(mask)
        if c != self.num_anchors * (5 + self.classes):
            raise ValueError(
                f"[yolo] expects {self.num_anchors} x (5 + {self.classes}) channels, got {c}"
            )
        if int_option(section, "new_coords", 0):
            raise NotImplementedError("[yolo] new_coords=1 (scaled-YOLOv4 decoding)")
        if float_option(section, "nms_threshold", 0.0) > 0:
            # OpenCV would run NMS inside the layer and zero suppressed rows; we leave NMS to
            # the post-processing rather than silently produce a different output.
            raise NotImplementedError("[yolo] nms_threshold > 0 (in-layer NMS)")
        self.scale_x_y = float_option(section, "scale_x_y", 1.0)
        self.thresh = float_option(section, "thresh", DEFAULT_CLASS_THRESH)
        net_h, net_w = net_hw
        # Row r = (gy * grid_w + gx) * num_anchors + a, the order OpenCV emits.
        gy, gx, a = np.meshgrid(
            np.arange(grid_h), np.arange(grid_w), np.arange(self.num_anchors), indexing="ij"
        )
        grid = np.stack([gx.ravel(), gy.ravel()], axis=-1)[None]
        inv_grid = np.array([1.0 / grid_w, 1.0 / grid_h])
        anchor_wh = anchors[mask][a.ravel()] / np.array([net_w, net_h])
        self.rows = grid_h * grid_w * self.num_anchors
        self.out_shape: Shape = (1, self.rows, 5 + self.classes)
        f32 = np.float32
        with warnings.catch_warnings():
            # MXNet registers an initializer per constant, named with id() of the Parameter:
            # once an earlier net is garbage-collected its id can come back, and MXNet warns
            # that the new registration overrides the dead one (seen once in CI; harmless).
            warnings.filterwarnings("ignore", ".*New initializer", UserWarning)
            self.grid = self.params.get_constant("grid", grid.astype(f32))
            self.inv_grid = self.params.get_constant(
                "inv_grid", inv_grid.reshape(1, 1, 2).astype(f32)
            )
            self.anchor_wh = self.params.get_constant("anchor_wh", anchor_wh[None].astype(f32))

    def hybrid_forward(self, F: Any, x: Any, grid: Any, inv_grid: Any, anchor_wh: Any) -> Any:
        n = 5 + self.classes
        # (N, A*n, H, W) -> (N, A, n, H*W) -> (N, H*W, A, n) -> (N, H*W*A, n)
        x = F.reshape(x, shape=(0, self.num_anchors, n, -1))
        x = F.transpose(x, axes=(0, 3, 1, 2))
        x = F.reshape(x, shape=(0, -1, n))
        txy = F.slice_axis(x, axis=2, begin=0, end=2)
        twh = F.slice_axis(x, axis=2, begin=2, end=4)
        obj = F.sigmoid(F.slice_axis(x, axis=2, begin=4, end=5))
        cls = F.sigmoid(F.slice_axis(x, axis=2, begin=5, end=None))

        sxy = F.sigmoid(txy)
        if self.scale_x_y != 1.0:
            sxy = sxy * self.scale_x_y - (self.scale_x_y - 1.0) / 2.0
        cxy = F.broadcast_mul(F.broadcast_add(sxy, grid), inv_grid)
        wh = F.broadcast_mul(F.exp(twh), anchor_wh)
        # OpenCV convention: class column = objectness * class probability, zeroed at or below
        # thresh.  Multiplying by a 0/1 mask keeps it to ops that export cleanly to ONNX.
        prob = F.broadcast_mul(cls, obj)
        prob = prob * (prob > self.thresh)
        return F.concat(cxy, wh, obj, prob, dim=2)
