"""The darknet layers as MXNet Gluon blocks, one per :mod:`.darknet_plan` layer, each
reproducing what darknet (and OpenCV's darknet reader) computes;
:class:`~lensbus_inference.packaging.darknet.DarknetNet` wires them.
"""

from __future__ import annotations

import warnings
from typing import Any

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from lensbus_inference.packaging.darknet_plan import (
    LEAKY_SLOPE,
    Conv,
    MaxPool,
    Route,
    Shortcut,
    Upsample,
    Yolo,
)


class DarknetConv(HybridBlock):
    """[convolutional]: conv (batch norm already folded into the plan's weights) + activation."""

    def __init__(self, spec: Conv, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        with self.name_scope():
            # Always with a bias: with batch_normalize the folded BN becomes that bias.
            self.conv = nn.Conv2D(
                spec.filters,
                spec.size,
                strides=spec.stride,
                padding=spec.pad,
                groups=spec.groups,
                use_bias=True,
                in_channels=spec.in_channels,
            )

    def load(self) -> None:
        """The plan's (folded) weights into the parameters."""
        assert self.spec.kernel is not None and self.spec.bias is not None
        self.conv.weight.set_data(mx.nd.array(self.spec.kernel))
        self.conv.bias.set_data(mx.nd.array(self.spec.bias))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.conv(x)
        activation = self.spec.activation
        if activation == "leaky":
            return F.LeakyReLU(x, act_type="leaky", slope=LEAKY_SLOPE)
        if activation == "relu":
            return F.relu(x)
        if activation == "logistic":
            return F.sigmoid(x)
        return x


class DarknetMaxPool(HybridBlock):
    """[maxpool], reproducing darknet's padding (see :func:`.darknet_plan._maxpool`).

    MXNet pooling only pads symmetrically, so: pool with the "before" padding on both
    sides, plus an explicit right/bottom Pad only where darknet's output needs more.  Pad
    replicates the edge, which for a max is exact: every window that touches a padded pixel
    also holds the border pixel it copies.

    Padding only what is needed matters for speed: padding a 416x416 map to 417x417 for a
    2x2/2 pool whose windows never reach the padding made MXNet's pooling ~5x slower.
    """

    def __init__(self, spec: MaxPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        s = self.spec
        if s.extra_h or s.extra_w:
            x = F.pad(x, mode="edge", pad_width=(0, 0, 0, 0, 0, s.extra_h, 0, s.extra_w))
        return F.Pooling(
            x,
            kernel=(s.size, s.size),
            stride=(s.stride, s.stride),
            pad=(s.pad, s.pad),
            pool_type="max",
        )


class DarknetUpsample(HybridBlock):
    """[upsample]: nearest-neighbour, integer stride."""

    def __init__(self, spec: Upsample, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.UpSampling(x, scale=self.spec.stride, sample_type="nearest")


class DarknetRoute(HybridBlock):
    """[route]: concatenate (along channels) the outputs of earlier layers."""

    def __init__(self, spec: Route, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.sources = spec.sources

    def hybrid_forward(self, F: Any, *inputs: Any) -> Any:
        x = inputs[0] if len(inputs) == 1 else F.concat(*inputs, dim=1)
        if self.spec.groups > 1:
            begin = self.spec.begin
            x = F.slice_axis(x, axis=1, begin=begin, end=begin + self.spec.out_shape[0])
        return x


class DarknetShortcut(HybridBlock):
    """[shortcut]: residual add of the previous layer and layer ``from``."""

    def __init__(self, spec: Shortcut, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = spec.source

    def hybrid_forward(self, F: Any, previous: Any, other: Any) -> Any:
        return previous + other


class DarknetYolo(HybridBlock):
    """[yolo]: decode the raw conv output to OpenCV's row layout (see
    :mod:`lensbus_inference.packaging.darknet`), with the plan's constants."""

    def __init__(self, spec: Yolo, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.classes = spec.classes
        with warnings.catch_warnings():
            # MXNet registers an initializer per constant, named with id() of the Parameter:
            # once an earlier net is garbage-collected its id can come back, and MXNet warns
            # that the new registration overrides the dead one (seen once in CI; harmless).
            warnings.filterwarnings("ignore", ".*New initializer", UserWarning)
            self.grid = self.params.get_constant("grid", spec.grid)
            self.inv_grid = self.params.get_constant("inv_grid", spec.inv_grid)
            self.anchor_wh = self.params.get_constant("anchor_wh", spec.anchor_wh)

    def hybrid_forward(self, F: Any, x: Any, grid: Any, inv_grid: Any, anchor_wh: Any) -> Any:
        s = self.spec
        n = 5 + s.classes
        # (N, A*n, H, W) -> (N, A, n, H*W) -> (N, H*W, A, n) -> (N, H*W*A, n)
        x = F.reshape(x, shape=(0, s.num_anchors, n, -1))
        x = F.transpose(x, axes=(0, 3, 1, 2))
        x = F.reshape(x, shape=(0, -1, n))
        txy = F.slice_axis(x, axis=2, begin=0, end=2)
        twh = F.slice_axis(x, axis=2, begin=2, end=4)
        obj = F.sigmoid(F.slice_axis(x, axis=2, begin=4, end=5))
        cls = F.sigmoid(F.slice_axis(x, axis=2, begin=5, end=None))

        sxy = F.sigmoid(txy)
        if s.scale_x_y != 1.0:
            sxy = sxy * s.scale_x_y - (s.scale_x_y - 1.0) / 2.0
        cxy = F.broadcast_mul(F.broadcast_add(sxy, grid), inv_grid)
        wh = F.broadcast_mul(F.exp(twh), anchor_wh)
        # OpenCV convention: class column = objectness * class probability, zeroed at or below
        # thresh (a 0/1 mask multiplied in).
        prob = F.broadcast_mul(cls, obj)
        prob = prob * (prob > s.thresh)
        return F.concat(cxy, wh, obj, prob, dim=2)
