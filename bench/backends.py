"""Backend benchmark (run by hand, not a test): lensbus's model path vs the raw framework call.

For YOLOv3-tiny 416x416 (MXNet, ONNX Runtime, OpenCV DNN, PyTorch; on a GPU PyTorch in fp16
too) and the text-orientation classifier
224x224 (ONNX Runtime, OpenCV DNN), on a real 1280x720 camera-sized frame (darknet's dog.jpg
resized):

* ``lensbus``: ``LoadedModel.run(frame)``: preprocess (resize, normalise, layout), the
  backend's forward, and the decoder (thresholds, NMS, labels, boxes in frame pixels);
* ``raw``: the framework alone on the same prepared tensor, with its own model object:
  MXNet ``SymbolBlock`` + ``optimize_for(MKLDNN)`` (GPU: hybridize on ``mx.gpu``), forward
  + ``asnumpy``; ``onnxruntime.InferenceSession.run``; ``cv2.dnn`` ``setInput`` +
  ``forward``; PyTorch: the package's TorchScript module (``torch.jit.load``), forward under
  ``inference_mode`` + ``.numpy()``.

Milliseconds per frame are the median of the timed runs after warm-up; backends run
interleaved (one frame each in turn, the starting one rotating every round), so drifting
load hits all alike.  Prints a markdown table with the overhead ratio (lensbus / raw), the
lensbus stage split, and MXNet vs ORT.

    python bench/backends.py                 # CPU, 100 timed runs each
    python bench/backends.py --quick         # 30 timed runs each
    python bench/backends.py --device gpu    # GPU paths (CUDA MXNet, onnxruntime-gpu, ...)
    python bench/backends.py --only torch --json out.json   # one framework, and a JSON copy
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from early_threads import THREADS as _THREADS

from lensbus.backends import parse_device
from lensbus.modelpkg import Package, verify, write_package
from lensbus_inference.model import LoadedModel, load_model
from lensbus_inference.packaging.demo_packages import build_classifier, build_demo
from lensbus_inference.packaging.folders import MissingAssetError
from lensbus_inference.preprocess import Preprocessor

# LENSBUS_PHOTOS: a folder holding dog.jpg (bench/gpu.sh points it at the photos it carries).
FRAME = Path(os.environ.get("LENSBUS_PHOTOS", "/usr/share/darknet/data")) / "dog.jpg"
CASES = [
    ("yolov3-tiny 416", "mxnet", "yolov3-tiny-mxnet"),
    ("yolov3-tiny 416", "onnx", "yolov3-tiny-onnx"),
    ("yolov3-tiny 416", "opencv", "yolov3-tiny-opencv"),
    ("yolov3-tiny 416", "torch", "yolov3-tiny-torch"),
    ("text-orientation 224", "onnx", "text-orientation-onnx"),
    ("text-orientation 224", "opencv", "text-orientation-opencv"),
]


# ------------------------------------------------------------------------------ raw framework


def raw_mxnet(pkg: Package, x: np.ndarray, device: str) -> Callable[[], object]:
    import mxnet as mx

    kind, index = parse_device(device)
    ctx = mx.gpu(index) if kind == "gpu" else mx.cpu()
    net = mx.gluon.SymbolBlock.imports(
        str(pkg.path("symbol")), ["data"], str(pkg.path("params")), ctx=ctx
    )
    xs = mx.nd.array(x, ctx=ctx)
    if kind == "gpu":
        net.hybridize(static_alloc=True, static_shape=True)
    else:
        net.optimize_for(xs, backend="MKLDNN", static_alloc=True, static_shape=True)

    def call() -> object:
        out = net(xs)
        return [o.asnumpy() for o in out] if isinstance(out, list | tuple) else out.asnumpy()

    return call


def raw_onnx(pkg: Package, x: np.ndarray, device: str) -> Callable[[], object]:
    import onnxruntime as ort

    kind, index = parse_device(device)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _THREADS:
        opts.intra_op_num_threads = int(_THREADS)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as lensbus does
    providers: list[Any] = ["CPUExecutionProvider"]
    if kind == "gpu":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    sess = ort.InferenceSession(str(pkg.path("model")), opts, providers=providers)
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def raw_opencv(pkg: Package, x: np.ndarray, device: str) -> Callable[[], object]:
    model = pkg.path("model")
    if model.suffix == ".weights":
        net = cv2.dnn.readNetFromDarknet(str(pkg.path("config")), str(model))
    else:
        net = cv2.dnn.readNet(str(model))
    if parse_device(device)[0] == "gpu":
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
    names = net.getUnconnectedOutLayersNames()

    def call() -> object:
        net.setInput(x)
        return net.forward(names)

    return call


def raw_torch(pkg: Package, x: np.ndarray, device: str) -> Callable[[], object]:
    """The module's forward on the tensor + ``.numpy()``; fp16 on a GPU when the manifest
    says so, as the backend does."""
    import warnings

    import torch

    if _THREADS:
        torch.set_num_threads(int(_THREADS))
    kind, index = parse_device(device)
    dev = f"cuda:{index}" if kind == "gpu" else "cpu"
    path = pkg.path("model")
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        if kind == "gpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, dev)
        net = program.module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=dev).eval()
    half = kind == "gpu" and pkg.manifest.precision == "fp16"
    if half:
        net.half()
    xt = torch.from_numpy(x).to(dev, torch.float16 if half else torch.float32)

    def call() -> object:
        with torch.inference_mode():
            out = net(xt)
            outs = out if isinstance(out, list | tuple) else [out]
            return [o.float().cpu().numpy() for o in outs]

    return call


RAW: dict[str, Callable[[Package, np.ndarray, str], Callable[[], object]]] = {
    "mxnet": raw_mxnet,
    "onnx": raw_onnx,
    "opencv": raw_opencv,
    "torch": raw_torch,
}


# ------------------------------------------------------------------------------ timing


@dataclass
class Case:
    model_name: str
    framework: str
    lensbus: Callable[[], Any] | None = None
    raw: Callable[[], object] | None = None
    error: str = ""
    times: dict[str, list[float]] = field(default_factory=lambda: {"lensbus": [], "raw": []})
    stages: dict[str, list[float]] = field(
        default_factory=lambda: {"pre": [], "compute": [], "post": []}
    )


def prepare(key: str, pkg: Package, frame: np.ndarray, device: str, threads: int | None) -> Case:
    m = pkg.manifest
    case = Case(key.split("-")[0], m.framework)
    try:
        model: LoadedModel = load_model(pkg, device, threads)
        model.warmup()
        case.raw = RAW[m.framework](pkg, Preprocessor(m.input)(frame).tensor, device)
    except Exception as exc:  # ModelLoadError (no GPU build, ...): a row, not a crash
        case.error = str(exc).splitlines()[0][:300]
        return case
    h, w = frame.shape[:2]

    def run() -> Any:
        return model.run(frame, w, h)

    case.lensbus = run
    return case


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(cases: list[Case], warmup: int, runs: int) -> None:
    live = [c for c in cases if c.lensbus and c.raw]
    if not live:
        return
    for c in live:
        for _ in range(warmup):
            assert c.lensbus is not None and c.raw is not None
            c.lensbus()
            c.raw()
    for i in range(runs):
        k = i % len(live)
        for c in live[k:] + live[:k]:  # rotate who goes first
            assert c.lensbus is not None and c.raw is not None
            pairs = [("lensbus", c.lensbus), ("raw", c.raw)]
            for name, fn in pairs if i % 2 else pairs[::-1]:
                dt, out = timed(fn)
                c.times[name].append(dt)
                if name == "lensbus":
                    c.stages["pre"].append(out.preprocess_s)
                    c.stages["compute"].append(out.compute_s)
                    c.stages["post"].append(out.postprocess_s)


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def version(module: str) -> str:
    """``module``'s version, or "absent" (the GPU machine has no MXNet)."""
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return "absent"


def environment(device: str, runs: int) -> str:
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, device {device}, Python "
        f"{platform.python_version()}, MXNet {version('mxnet')} "
        f"(MXNET_OMP_MAX_THREADS={os.environ.get('MXNET_OMP_MAX_THREADS')}), onnxruntime "
        f"{version('onnxruntime')}, PyTorch {version('torch')}, OpenCV {cv2.__version__}; "
        f"median of {runs} runs, frame 1280x720"
    )


def as_json(cases: list[Case], device: str, runs: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for c in cases:
        row: dict[str, Any] = {"model": c.model_name, "framework": c.framework}
        if c.error:
            row["error"] = c.error
        else:
            lb, raw = ms(c.times["lensbus"]), ms(c.times["raw"])
            row.update(lensbus_ms=round(lb, 3), raw_ms=round(raw, 3), ratio=round(lb / raw, 3))
            row.update({f"{s}_ms": round(ms(c.stages[s]), 3) for s in ("pre", "compute", "post")})
        rows.append(row)
    return {"environment": environment(device, runs), "device": device, "rows": rows}


def report(cases: list[Case], device: str, runs: int) -> None:
    print(f"\n{environment(device, runs)}\n")
    print("| model | framework | lensbus ms | raw ms | lensbus/raw | pre / compute / post ms |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for c in cases:
        if c.error:
            print(f"| {c.model_name} | {c.framework} | - | - | - | unavailable: {c.error} |")
            continue
        lb, raw = ms(c.times["lensbus"]), ms(c.times["raw"])
        split = " / ".join(f"{ms(c.stages[s]):.2f}" for s in ("pre", "compute", "post"))
        ratio = lb / raw
        print(f"| {c.model_name} | {c.framework} | {lb:.2f} | {raw:.2f} | {ratio:.2f} | {split} |")
    by = {(c.model_name, c.framework): c for c in cases if not c.error}
    print()
    for model_name in dict.fromkeys(c.model_name for c in cases):
        ort_case = by.get((model_name, "onnx"))
        if not ort_case:
            continue
        for other in ("mxnet", "opencv"):
            o = by.get((model_name, other))
            if o:
                raw = ms(o.times["raw"]) / ms(ort_case.times["raw"])
                lb = ms(o.times["lensbus"]) / ms(ort_case.times["lensbus"])
                print(f"- {model_name}: {other} / ORT = {raw:.2f} raw, {lb:.2f} through lensbus")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), gpu or gpu:N")
    parser.add_argument("--quick", action="store_true", help="30 timed runs instead of 100")
    parser.add_argument("--runs", type=int, help="timed runs per backend (overrides --quick)")
    parser.add_argument("--models", default=".lensbus/models", help="demo package folder")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--only", help="comma-separated frameworks to run (default: all)")
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args()
    runs = args.runs or (30 if args.quick else 100)

    if not FRAME.is_file():
        print(f"needs {FRAME} (Debian package darknet)", file=sys.stderr)
        return 1
    frame = cv2.resize(cv2.imread(str(FRAME)), (1280, 720), interpolation=cv2.INTER_AREA)
    missing: list[str] = []  # weights not installed here (the GPU machine carries YOLO only)
    folders = build_demo(args.models, missing)
    try:
        folders["text-orientation-opencv"] = build_classifier(args.models, framework="opencv")
    except MissingAssetError as exc:
        missing.append(str(exc))
    for line in dict.fromkeys(missing):
        print(f"not built: {line}", file=sys.stderr)
    chosen = [c for c in CASES if not args.only or c[1] in args.only.split(",")]
    if parse_device(args.device)[0] == "gpu" and "yolov3-tiny-torch" in folders:
        folders["yolov3-tiny-torch-fp16"] = half_package(folders["yolov3-tiny-torch"])
        chosen.append(("yolov3-tiny 416 fp16", "torch", "yolov3-tiny-torch-fp16"))
    cases = []
    for model_name, framework, key in chosen:
        if key not in folders:  # not built here (MXNet or PyTorch not installed)
            cases.append(Case(model_name, framework, error=f"package {key} not built here"))
            continue
        cases.append(prepare(key, verify(folders[key]), frame, args.device, args.threads))
        cases[-1].model_name = model_name
    measure(cases, warmup=5, runs=runs)
    report(cases, args.device, runs)
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(cases, args.device, runs), indent=2) + "\n")
    return 0


def half_package(folder: Path) -> Path:
    """A copy of a torch package whose manifest says ``precision: fp16``."""
    half = folder.with_name(folder.name + "-fp16")
    if not half.is_dir():
        shutil.copytree(folder, half)
    m = verify(folder).manifest
    files = {role: f.path for role, f in m.files.items()}
    fields = m.model_dump(exclude={"v", "files", "precision"})
    write_package(half, files, **{**fields, "name": m.name + "-fp16", "precision": "fp16"})
    return half


if __name__ == "__main__":
    sys.exit(main())
