"""The darknet importer's ONNX target: a :mod:`.darknet_plan` plan written as an ONNX graph
with onnx's own helper API (no MXNet, no torch).

The graph follows the output convention in :mod:`.darknet_plan`: input ``data``
``(1, 3, H, W)``, output ``output`` ``(1, boxes, 5 + classes)``.  It uses opset 13 and IR
version 7, which ONNX Runtime and OpenCV's ONNX reader (4.10 on) both load, and only the
operators both implement (Conv, LeakyRelu, MaxPool with asymmetric pads, Resize nearest,
Concat, Slice, Reshape, Transpose, Sigmoid, Exp, Add, Mul, Greater, Cast).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

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

OPSET = 13  # Resize/Slice/Split take their sizes as inputs from 13 on; OpenCV reads 13
IR_VERSION = 7  # the IR of opset 13: readers older than the onnx package writing it accept it
INPUT, OUTPUT = "data", "output"

_ACTIVATIONS = {"leaky": ("LeakyRelu", {"alpha": LEAKY_SLOPE}), "relu": ("Relu", {})}
_ACTIVATIONS["logistic"] = ("Sigmoid", {})


class _Graph:
    """Nodes and initializers as they are added, with unique names."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str = "", **attrs: Any) -> str:
        self.count += 1
        out = name or f"{op_type.lower()}_{self.count}"
        node = self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs)
        self.nodes.append(node)
        return out

    def cols(self, x: str, begin: int, end: int, axes: str) -> str:
        """``x[:, :, begin:end]`` (``axes``: the name of an int64 constant ``[2]``)."""
        starts = self.const(f"{x}_from{begin}", [begin], np.int64)
        ends = self.const(f"{x}_to{end}", [end], np.int64)
        return self.op("Slice", [x, starts, ends, axes])


def _conv(g: _Graph, spec: Conv, x: str, i: int) -> str:
    assert spec.kernel is not None and spec.bias is not None, "plan without weights"
    w = g.const(f"conv{i}_weight", spec.kernel)
    b = g.const(f"conv{i}_bias", spec.bias)
    p = spec.pad
    attrs = {"kernel_shape": [spec.size] * 2, "strides": [spec.stride] * 2}
    y = g.op("Conv", [x, w, b], f"conv{i}", pads=[p] * 4, group=spec.groups, **attrs)
    if spec.activation == "linear":
        return y
    op_type, act_attrs = _ACTIVATIONS[spec.activation]
    return g.op(op_type, [y], f"conv{i}_{spec.activation}", **act_attrs)


def _maxpool(g: _Graph, spec: MaxPool, x: str, i: int) -> str:
    # ONNX pads are ignored by a max (never the maximum), as darknet ignores out-of-bounds
    # pixels: darknet's asymmetric padding is the pads themselves.
    pads = [spec.pad, spec.pad, spec.pad + spec.extra_h, spec.pad + spec.extra_w]
    kernel = [spec.size] * 2
    return g.op(
        "MaxPool", [x], f"maxpool{i}", kernel_shape=kernel, strides=[spec.stride] * 2, pads=pads
    )


def _upsample(g: _Graph, spec: Upsample, x: str, i: int) -> str:
    s = float(spec.stride)
    scales = g.const(f"upsample{i}_scales", [1.0, 1.0, s, s])
    # "asymmetric" + "floor": output pixel (y, x) copies input (y // s, x // s), darknet's way
    return g.op(
        "Resize",
        [x, "", scales],
        f"upsample{i}",
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )


def _route(g: _Graph, spec: Route, inputs: list[str], i: int) -> str:
    x = inputs[0] if len(inputs) == 1 else g.op("Concat", inputs, f"route{i}", axis=1)
    if spec.groups == 1:
        return x
    begin, end = spec.begin, spec.begin + spec.out_shape[0]
    starts = g.const(f"route{i}_starts", [begin], np.int64)
    ends = g.const(f"route{i}_ends", [end], np.int64)
    axes = g.const(f"route{i}_axes", [1], np.int64)
    return g.op("Slice", [x, starts, ends, axes], f"route{i}_group")


def _yolo(g: _Graph, spec: Yolo, x: str, i: int) -> str:
    n, p = 5 + spec.classes, f"yolo{i}"
    # (1, A*n, H, W) -> (1, A, n, H*W) -> (1, H*W, A, n) -> (1, rows, n)
    x = g.op("Reshape", [x, g.const(f"{p}_shape4", [1, spec.num_anchors, n, -1], np.int64)])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    x = g.op("Reshape", [x, g.const(f"{p}_shape3", [1, spec.rows, n], np.int64)])
    axes = g.const(f"{p}_axes", [2], np.int64)
    sxy = g.op("Sigmoid", [g.cols(x, 0, 2, axes)])
    if spec.scale_x_y != 1.0:
        sxy = g.op("Mul", [sxy, g.const(f"{p}_scale_x_y", [spec.scale_x_y])])
        sxy = g.op("Sub", [sxy, g.const(f"{p}_shift", [(spec.scale_x_y - 1.0) / 2.0])])
    cxy = g.op("Add", [sxy, g.const(f"{p}_grid", spec.grid)])
    cxy = g.op("Mul", [cxy, g.const(f"{p}_inv_grid", spec.inv_grid)])
    wh = g.op(
        "Mul", [g.op("Exp", [g.cols(x, 2, 4, axes)]), g.const(f"{p}_anchor_wh", spec.anchor_wh)]
    )
    obj = g.op("Sigmoid", [g.cols(x, 4, 5, axes)])
    prob = g.op("Mul", [g.op("Sigmoid", [g.cols(x, 5, n, axes)]), obj])
    # class column = objectness * class probability, zeroed at or below thresh (OpenCV's)
    above = g.op("Greater", [prob, g.const(f"{p}_thresh", [spec.thresh])])
    prob = g.op("Mul", [prob, g.op("Cast", [above], to=g.onnx.TensorProto.FLOAT)])
    return g.op("Concat", [cxy, wh, obj, prob], p, axis=2)


def _node(g: _Graph, spec: Layer, outputs: list[str], i: int) -> str:
    x = outputs[-1] if outputs else INPUT
    if isinstance(spec, Conv):
        return _conv(g, spec, x, i)
    if isinstance(spec, MaxPool):
        return _maxpool(g, spec, x, i)
    if isinstance(spec, Upsample):
        return _upsample(g, spec, x, i)
    if isinstance(spec, Route):
        return _route(g, spec, [outputs[s] for s in spec.sources], i)
    if isinstance(spec, Shortcut):
        return g.op("Add", [x, outputs[spec.source]], f"shortcut{i}")
    return _yolo(g, spec, x, i)


def onnx_model(plan: Plan) -> Any:
    """The ONNX model (``onnx.ModelProto``) of a plan with its weights loaded."""
    import onnx

    if not plan.loaded:
        raise ValueError("the ONNX target needs the plan's weights (plan_darknet(cfg, weights))")
    g = _Graph(onnx)
    outputs: list[str] = []
    for i, spec in enumerate(plan.layers):
        outputs.append(_node(g, spec, outputs, i))
    yolos = [outputs[i] for i in plan.yolo_indices]
    if len(yolos) == 1:
        g.op("Identity", yolos, OUTPUT)
    else:
        g.op("Concat", yolos, OUTPUT, axis=1)
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        g.nodes,
        "darknet",
        [onnx.helper.make_tensor_value_info(INPUT, f32, list(plan.input_shape))],
        [onnx.helper.make_tensor_value_info(OUTPUT, f32, list(plan.output_shape))],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="lensbus darknet importer",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def export_onnx(plan: Plan, out_dir: str | Path, prefix: str) -> dict[str, str]:
    """Write ``<prefix>.onnx`` (input ``data``, fixed shape): ``{"model": path}``."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = str(out / f"{prefix}.onnx")
    onnx.save(onnx_model(plan), path)
    log.info("darknet -> %s", path)
    return {"model": path}
