"""The darknet importer's MXNet target: a :mod:`.darknet_plan` plan as a Gluon network,
exported to MXNet files (``-symbol.json`` + ``-0000.params``).

The layers are in :mod:`~lensbus_inference.packaging.darknet_layers`; the output
convention every target follows is in :mod:`~lensbus_inference.packaging.darknet_plan`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from lensbus_inference.packaging.darknet_layers import (
    DarknetConv,
    DarknetMaxPool,
    DarknetRoute,
    DarknetShortcut,
    DarknetUpsample,
    DarknetYolo,
)
from lensbus_inference.packaging.darknet_plan import (
    Conv,
    Layer,
    MaxPool,
    Plan,
    Route,
    Shortcut,
    Upsample,
    Yolo,
    plan_darknet,
)

log = logging.getLogger(__name__)

# plan layer -> (Gluon block, parameter name prefix); the prefixes name the parameters in
# the exported files, so they stay what they were before the plan existed.
_BLOCKS: dict[type, tuple[type[HybridBlock], str]] = {
    Conv: (DarknetConv, "conv"),
    MaxPool: (DarknetMaxPool, "maxpool"),
    Upsample: (DarknetUpsample, "upsample"),
    Route: (DarknetRoute, "route"),
    Shortcut: (DarknetShortcut, "shortcut"),
    Yolo: (DarknetYolo, "yolo"),
}


def _block(spec: Layer, index: int) -> HybridBlock:
    cls, name = _BLOCKS[type(spec)]
    return cls(spec, prefix=f"{name}{index}_")


class DarknetNet(HybridBlock):
    """A darknet plan as a Gluon HybridBlock: ``(N, 3, H, W)`` -> ``(N, boxes, 5 + classes)``."""

    def __init__(self, plan: Plan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan
        # A HybridSequential used only as a container (registers the children); the forward
        # pass below wires them up itself because routes and shortcuts are not sequential.
        self.layers = nn.HybridSequential(prefix="")
        with self.name_scope():
            for i, spec in enumerate(plan.layers):
                self.layers.add(_block(spec, i))
        self._yolo_indices = plan.yolo_indices

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.plan.input_shape

    def load_plan_weights(self) -> None:
        """Initialise all parameters from the plan's (BN-folded) weights."""
        self.initialize(mx.init.Zero(), force_reinit=True)
        for layer in self.layers:
            if isinstance(layer, DarknetConv):
                layer.load()

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


def mxnet_net(plan: Plan) -> DarknetNet:
    """The Gluon network of ``plan``: its weights when loaded, else random (Xavier)."""
    net = DarknetNet(plan, prefix="darknet_")
    if plan.loaded:
        net.load_plan_weights()
    else:
        net.initialize(mx.init.Xavier())
    return net


def build_darknet(cfg: str | Path, weights: str | Path | None = None) -> DarknetNet:
    """Build the Gluon network for ``cfg`` and, if given, load ``weights`` into it."""
    return mxnet_net(plan_darknet(cfg, weights))


def export_mxnet(plan: Plan, out_dir: str | Path, prefix: str) -> dict[str, str]:
    """Write ``<prefix>-symbol.json`` and ``<prefix>-0000.params`` (load them with
    ``mx.gluon.SymbolBlock.imports(symbol, ["data"], params)``): ``{"symbol": .., "params": ..}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = mxnet_net(plan)
    net.hybridize(static_alloc=True, static_shape=True)
    # One forward builds the cached graph, which export() serialises.
    y = net(mx.nd.zeros(plan.input_shape))
    if y.shape != plan.output_shape:
        raise RuntimeError(f"network output {y.shape}, expected {plan.output_shape}")
    stem = str(out / prefix)
    net.export(stem, epoch=0)
    paths = {"symbol": f"{stem}-symbol.json", "params": f"{stem}-0000.params"}
    log.info("darknet -> %s", paths)
    return paths
