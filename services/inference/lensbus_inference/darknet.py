"""Darknet (``.cfg`` + ``.weights``) reader that builds the network as an MXNet Gluon block.

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
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
import numpy.typing as npt
from mxnet.gluon import HybridBlock, nn

log = logging.getLogger(__name__)

Section = dict[str, str]
FloatArray = npt.NDArray[np.float32]

# Batch-norm epsilon, added to the running variance.  OpenCV's darknet importer uses 1e-6
# (measured: max diff vs OpenCV on yolov3-tiny ~6e-6 with 1e-6, ~1e-4 with 1e-5).  Darknet
# itself differs by fork (pjreddie: std + 1e-6, AlexeyAB: var + 1e-5); all agree to ~1e-4.
BN_EPS = 1e-6
# Darknet's "leaky" activation slope.
LEAKY_SLOPE = 0.1
# OpenCV's region layer zeroes class probabilities at or below this unless the cfg says otherwise.
DEFAULT_CLASS_THRESH = 0.2


# --------------------------------------------------------------------------------------------
# cfg parsing
# --------------------------------------------------------------------------------------------


def parse_cfg(path: str | Path) -> list[Section]:
    """Parse a darknet cfg into a list of sections, in file order.

    Each section is a dict of the raw string options plus ``"type"`` holding the section name
    (``"net"``, ``"convolutional"``, ...).  Like darknet, whitespace anywhere in a line is
    ignored (``saturation = 1.5`` is ``saturation=1.5``) and lines starting with ``#`` or ``;``
    are comments; unlike darknet, a trailing ``# comment`` after an option is tolerated too.
    """
    path = Path(path)
    sections: list[Section] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = re.sub(r"\s+", "", raw.split("#", 1)[0])
        if not line or line.startswith(";"):
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ValueError(f"{path}:{lineno}: malformed section header {raw!r}")
            sections.append({"type": line[1:-1].lower()})
            continue
        if not sections:
            raise ValueError(f"{path}:{lineno}: option {raw!r} before the first [section]")
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ValueError(f"{path}:{lineno}: expected key=value, got {raw!r}")
        # darknet's option_find returns the first match, so a repeated key keeps its first value
        sections[-1].setdefault(key, value)
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise ValueError(f"{path}: a darknet cfg must start with a [net] section")
    return sections


def _int(section: Section, key: str, default: int | None = None) -> int:
    if key in section:
        return int(section[key])
    if default is None:
        raise ValueError(f"[{section['type']}] is missing required option {key!r}")
    return default


def _float(section: Section, key: str, default: float) -> float:
    return float(section[key]) if key in section else default


def _ints(section: Section, key: str) -> list[int]:
    return [int(v) for v in section[key].split(",") if v]


# --------------------------------------------------------------------------------------------
# weights file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsHeader:
    major: int
    minor: int
    revision: int
    seen: int  # images seen during training; informational only


def read_weights(
    path: str | Path, expected_count: int | None = None
) -> tuple[WeightsHeader, FloatArray]:
    """Read a darknet ``.weights`` file: header, then one flat float32 array.

    The header is three int32 (major, minor, revision) and ``seen``, which darknet writes as
    int64 from format 0.2 on and as int32 before.  If ``expected_count`` is given the number of
    floats must match it exactly: a mismatch means the weights belong to another cfg, and
    loading them anyway would produce a network that runs but outputs garbage.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"{path}: too short ({len(data)} bytes) to be a darknet weights file")
    major, minor, revision = (int(v) for v in np.frombuffer(data, dtype="<i4", count=3))
    # Same test as darknet's load_weights_upto (the <1000 guard rejects byte-swapped files).
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        seen, offset = int(np.frombuffer(data, dtype="<i8", count=1, offset=12)[0]), 20
    else:
        seen, offset = int(np.frombuffer(data, dtype="<i4", count=1, offset=12)[0]), 16
    body = len(data) - offset
    if body % 4:
        raise ValueError(f"{path}: weights payload of {body} bytes is not a whole number of floats")
    weights = np.frombuffer(data, dtype="<f4", offset=offset)
    if expected_count is not None and weights.size != expected_count:
        raise ValueError(
            f"{path}: holds {weights.size} weights but the cfg needs {expected_count} "
            f"({'too few' if weights.size < expected_count else 'too many'}); "
            "the weights do not belong to this cfg"
        )
    return WeightsHeader(major, minor, revision, seen), weights


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------

Shape = tuple[int, int, int]  # (channels, height, width) of one layer's output


class _DarknetConv(HybridBlock):
    """[convolutional]: conv (+ batch norm folded into it at load time) + activation."""

    def __init__(self, section: Section, in_shape: Shape, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c, h, w = in_shape
        self.filters = _int(section, "filters", 1)
        self.size = _int(section, "size", 1)
        self.stride = _int(section, "stride", 1)
        self.groups = _int(section, "groups", 1)
        # darknet: "pad=1" means same-ish padding (size // 2) and overrides "padding"
        self.pad = self.size // 2 if _int(section, "pad", 0) else _int(section, "padding", 0)
        self.batch_normalize = bool(_int(section, "batch_normalize", 0))
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


class _DarknetMaxPool(HybridBlock):
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
        self.size = _int(section, "size", 1)
        self.stride = _int(section, "stride", 1)
        padding = _int(section, "padding", self.size - 1)
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


class _DarknetUpsample(HybridBlock):
    """[upsample]: nearest-neighbour, integer stride (exports to ONNX Resize nearest)."""

    def __init__(self, section: Section, in_shape: Shape, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stride = _int(section, "stride", 2)
        if self.stride < 1 or _float(section, "scale", 1.0) != 1.0:
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


class _DarknetRoute(HybridBlock):
    """[route]: concatenate (along channels) the outputs of earlier layers."""

    def __init__(self, section: Section, index: int, shapes: list[Shape], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sources = [_resolve(i, index) for i in _ints(section, "layers")]
        # yolov4-tiny style "groups/group_id": take one channel slice of the (single) input
        self.groups = _int(section, "groups", 1)
        self.group_id = _int(section, "group_id", 0)
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


class _DarknetShortcut(HybridBlock):
    """[shortcut]: residual add of the previous layer and layer ``from``."""

    def __init__(self, section: Section, index: int, shapes: list[Shape], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = _resolve(_int(section, "from"), index)
        if section.get("activation", "linear") != "linear":
            raise NotImplementedError("[shortcut] with a non-linear activation")
        if shapes[self.source] != shapes[index - 1]:
            raise NotImplementedError("[shortcut] between layers of different shapes")
        self.out_shape: Shape = shapes[index - 1]

    def hybrid_forward(self, F: Any, previous: Any, other: Any) -> Any:
        return previous + other


class _DarknetYolo(HybridBlock):
    """[yolo]: decode the raw conv output to OpenCV's row layout (see the module docstring).

    The grid offsets and per-row anchor sizes are precomputed constants of shape
    (1, rows, 2): the input size is fixed by the cfg, and constants are simpler to export than
    arange/tile gymnastics in the graph.
    """

    def __init__(
        self, section: Section, in_shape: Shape, net_hw: tuple[int, int], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        c, grid_h, grid_w = in_shape
        self.classes = _int(section, "classes", 20)
        anchors = np.array(_ints(section, "anchors"), dtype=np.float64).reshape(-1, 2)
        mask = _ints(section, "mask") if "mask" in section else list(range(len(anchors)))
        self.num_anchors = len(mask)
        if c != self.num_anchors * (5 + self.classes):
            raise ValueError(
                f"[yolo] expects {self.num_anchors} x (5 + {self.classes}) channels, got {c}"
            )
        if _int(section, "new_coords", 0):
            raise NotImplementedError("[yolo] new_coords=1 (scaled-YOLOv4 decoding)")
        if _float(section, "nms_threshold", 0.0) > 0:
            # OpenCV would run NMS inside the layer and zero suppressed rows; we leave NMS to
            # the post-processing rather than silently produce a different output.
            raise NotImplementedError("[yolo] nms_threshold > 0 (in-layer NMS)")
        self.scale_x_y = _float(section, "scale_x_y", 1.0)
        self.thresh = _float(section, "thresh", DEFAULT_CLASS_THRESH)
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
        self.grid = self.params.get_constant("grid", grid.astype(f32))
        self.inv_grid = self.params.get_constant("inv_grid", inv_grid.reshape(1, 1, 2).astype(f32))
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


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------


class DarknetNet(HybridBlock):
    """A darknet cfg as a Gluon HybridBlock: ``(N, 3, H, W)`` -> ``(N, boxes, 5 + classes)``."""

    def __init__(self, sections: list[Section], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        net, layer_sections = sections[0], sections[1:]
        self.height = _int(net, "height", 416)
        self.width = _int(net, "width", 416)
        self.channels = _int(net, "channels", 3)
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
                    layer = _DarknetConv(sec, prev, prefix=f"conv{i}_")
                elif kind in ("maxpool", "max"):
                    layer = _DarknetMaxPool(sec, prev, prefix=f"maxpool{i}_")
                elif kind == "upsample":
                    layer = _DarknetUpsample(sec, prev, prefix=f"upsample{i}_")
                elif kind == "route":
                    layer = _DarknetRoute(sec, i, shapes, prefix=f"route{i}_")
                elif kind == "shortcut":
                    layer = _DarknetShortcut(sec, i, shapes, prefix=f"shortcut{i}_")
                elif kind == "yolo":
                    layer = _DarknetYolo(sec, prev, (self.height, self.width), prefix=f"yolo{i}_")
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
        return sum(lay.weight_count for lay in self.layers if isinstance(lay, _DarknetConv))

    def load_darknet_weights(self, path: str | Path) -> WeightsHeader:
        """Initialise all parameters from a darknet weights file (BN folded into the convs)."""
        self.initialize(mx.init.Zero(), force_reinit=True)
        header, flat = read_weights(path, expected_count=self.weight_count)
        pos = 0
        for layer in self.layers:
            if isinstance(layer, _DarknetConv):
                pos = layer.load(flat, pos)
        assert pos == flat.size  # guaranteed by the expected_count check
        return header

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        outputs: list[Any] = []
        for layer in self.layers:
            if isinstance(layer, _DarknetRoute):
                x = layer(*[outputs[i] for i in layer.sources])
            elif isinstance(layer, _DarknetShortcut):
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


def _strip_initializer_inputs(model: Any) -> None:
    """Drop graph inputs that are really initializers (weights), in place.

    mxnet's exporter lists every weight as a graph input too.  ONNX (IR >= 4) treats such
    inputs as overridable defaults, so onnxruntime may not constant-fold or pre-pack them
    (and warns about each).  Measured on yolov3-tiny, 2 CPU cores: ~38 ms vs ~29 ms per frame.
    Only the image stays as an input.
    """
    init_names = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(keep)


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
    _strip_initializer_inputs(model)
    onnx.checker.check_model(model)
    onnx.save(model, paths["onnx"])
    log.info("darknet %s -> %s", cfg, paths)
    return paths
