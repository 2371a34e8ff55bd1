"""The darknet importer's torch target: a :mod:`.darknet_plan` plan as a PyTorch module (one
``nn.Module`` per layer), saved as TorchScript (``model.pt``, what the ``torch`` backend
loads).  The output convention is the plan's: ``(1, 3, H, W)`` -> ``(1, boxes, 5 + classes)``.

The module is traced, not scripted: the input size is fixed by the cfg, and tracing turns
the wiring of routes and shortcuts (a Python loop over the layers) into a plain graph.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lensbus_inference.packaging.darknet_plan import (
    LEAKY_SLOPE,
    Conv,
    Layer,
    MaxPool,
    Plan,
    Route,
    Shortcut,
    Upsample,
    Yolo,
)

log = logging.getLogger(__name__)


class DarknetConv(nn.Module):
    """[convolutional]: conv (batch norm folded into the plan's weights) + activation."""

    def __init__(self, spec: Conv) -> None:
        super().__init__()
        assert spec.kernel is not None and spec.bias is not None, "plan without weights"
        self.conv = nn.Conv2d(
            spec.in_channels,
            spec.filters,
            spec.size,
            stride=spec.stride,
            padding=spec.pad,
            groups=spec.groups,
        )
        assert self.conv.bias is not None  # a bias always: the folded batch norm lives there
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(spec.kernel))
            self.conv.bias.copy_(torch.from_numpy(spec.bias))
        self.activation = spec.activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.activation == "leaky":
            return F.leaky_relu(x, LEAKY_SLOPE)
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "logistic":
            return torch.sigmoid(x)
        return x


class DarknetMaxPool(nn.Module):
    """[maxpool] with darknet's padding: the symmetric part as the pool's padding (ignored by
    the max), the extra bottom/right part as a replicated edge (exact for a max: every window
    touching it also holds the border pixel it copies)."""

    def __init__(self, spec: MaxPool) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if s.extra_h or s.extra_w:
            x = F.pad(x, (0, s.extra_w, 0, s.extra_h), mode="replicate")
        return F.max_pool2d(x, s.size, s.stride, s.pad)


class DarknetUpsample(nn.Module):
    """[upsample]: nearest neighbour, integer stride."""

    def __init__(self, spec: Upsample) -> None:
        super().__init__()
        self.stride = spec.stride

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=float(self.stride), mode="nearest")


class DarknetRoute(nn.Module):
    """[route]: the outputs of earlier layers concatenated along channels (a slice of them
    with ``groups``)."""

    def __init__(self, spec: Route) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, *inputs: Tensor) -> Tensor:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        if self.spec.groups > 1:
            x = x[:, self.spec.begin : self.spec.begin + self.spec.out_shape[0]]
        return x


class DarknetYolo(nn.Module):
    """[yolo]: the raw conv output decoded to the plan's row layout."""

    grid: Tensor  # buffers (saved with the module), registered below
    inv_grid: Tensor
    anchor_wh: Tensor

    def __init__(self, spec: Yolo) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("grid", torch.from_numpy(spec.grid))
        self.register_buffer("inv_grid", torch.from_numpy(spec.inv_grid))
        self.register_buffer("anchor_wh", torch.from_numpy(spec.anchor_wh))

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        n = 5 + s.classes
        # (1, A*n, H, W) -> (1, A, n, H*W) -> (1, H*W, A, n) -> (1, rows, n)
        x = x.reshape(1, s.num_anchors, n, -1).permute(0, 3, 1, 2).reshape(1, s.rows, n)
        sxy = torch.sigmoid(x[..., 0:2])
        if s.scale_x_y != 1.0:
            sxy = sxy * s.scale_x_y - (s.scale_x_y - 1.0) / 2.0
        cxy = (sxy + self.grid) * self.inv_grid
        wh = torch.exp(x[..., 2:4]) * self.anchor_wh
        obj = torch.sigmoid(x[..., 4:5])
        prob = torch.sigmoid(x[..., 5:]) * obj
        # class column = objectness * class probability, zeroed at or below thresh (OpenCV's)
        prob = prob * (prob > s.thresh).to(prob.dtype)
        return torch.cat([cxy, wh, obj, prob], dim=2)


def _module(spec: Layer) -> nn.Module:
    if isinstance(spec, Conv):
        return DarknetConv(spec)
    if isinstance(spec, MaxPool):
        return DarknetMaxPool(spec)
    if isinstance(spec, Upsample):
        return DarknetUpsample(spec)
    if isinstance(spec, Route):
        return DarknetRoute(spec)
    if isinstance(spec, Yolo):
        return DarknetYolo(spec)
    return nn.Identity()  # [shortcut]: the add is in DarknetNet.forward


class DarknetNet(nn.Module):
    """A darknet plan as a PyTorch module: ``(1, 3, H, W)`` -> ``(1, boxes, 5 + classes)``."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        if not plan.loaded:
            raise ValueError("the torch target needs the plan's weights (plan_darknet(cfg, w))")
        self.plan = plan
        self.layers = nn.ModuleList(_module(spec) for spec in plan.layers)

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        for spec, layer in zip(self.plan.layers, self.layers, strict=True):
            if isinstance(spec, Route):
                x = layer(*[outputs[i] for i in spec.sources])
            elif isinstance(spec, Shortcut):
                x = outputs[-1] + outputs[spec.source]
            else:
                x = layer(x)
            outputs.append(x)
        yolo = [outputs[i] for i in self.plan.yolo_indices]
        return yolo[0] if len(yolo) == 1 else torch.cat(yolo, dim=1)


@contextlib.contextmanager
def _jit_allowed() -> Iterator[None]:
    """torch 2.13 marks every ``torch.jit`` call deprecated (for torch.export); TorchScript is
    still what the torch backend loads from a ``.pt`` (the package format asked for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        yield


def torch_module(plan: Plan) -> torch.jit.ScriptModule:
    """The plan as a traced TorchScript module, in eval mode."""
    net = DarknetNet(plan).eval()
    with torch.no_grad(), _jit_allowed():
        traced = torch.jit.trace(net, torch.zeros(plan.input_shape))
        y = traced(torch.zeros(plan.input_shape))
    if tuple(y.shape) != plan.output_shape:
        raise RuntimeError(f"network output {tuple(y.shape)}, expected {plan.output_shape}")
    return traced


def export_torch(plan: Plan, out_dir: str | Path, prefix: str) -> dict[str, str]:
    """Write ``<prefix>.pt`` (TorchScript; ``torch.jit.load`` it): ``{"model": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = str(out / f"{prefix}.pt")
    module = torch_module(plan)
    with _jit_allowed():
        torch.jit.save(module, path)
    log.info("darknet -> %s", path)
    return {"model": path}
