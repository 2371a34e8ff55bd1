"""The demo packages through ``load_model(...).run()`` give the real models' answers.

YOLOv3-tiny: the darknet importer's MXNet, ONNX and PyTorch packages and the OpenCV-darknet
package, each through the whole lensbus path (preprocess, backend, yolo decoder), must find
what OpenCV's own darknet reader finds on darknet's sample photos, decoded here independently
of lensbus.  A package whose framework is not installed here (MXNet, PyTorch) skips, naming
it.  Face SSD and the text-orientation classifier are checked against what a person sees in
real images.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from models_fixture import demo_packages, need
from skimage import data as skdata

from lensbus.images import decode_jpeg, encode_jpeg
from lensbus.modelpkg import Package, verify, write_package
from lensbus.schemas import Detection
from lensbus_inference.model import LoadedModel, load_model
from lensbus_inference.packaging.demo_packages import build_classifier

pytestmark = pytest.mark.slow

Array = npt.NDArray[Any]
IMAGES_DIR = Path("/usr/share/darknet/data")
IMAGES = ["dog.jpg", "person.jpg", "horses.jpg"]
YOLO = ["yolov3-tiny-mxnet", "yolov3-tiny-onnx", "yolov3-tiny-opencv", "yolov3-tiny-torch"]
needs_images = pytest.mark.skipif(
    not IMAGES_DIR.is_dir(), reason="needs darknet's sample photos (Debian package darknet)"
)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package]:
    return demo_packages(tmp_path_factory)


@pytest.fixture(scope="module")
def models(packages: dict[str, Package]) -> Iterator[dict[str, LoadedModel]]:
    loaded = {}
    for key, pkg in packages.items():
        loaded[key] = load_model(pkg, "cpu")
        loaded[key].warmup()
    yield loaded
    for m in loaded.values():
        m.close()


def _image(name: str) -> Array:
    image = cv2.imread(str(IMAGES_DIR / name))
    assert image is not None, name
    return image


# ------------------------------------------------------------------------------ reference


def _opencv_reference(pkg: Package, image: Array) -> list[tuple[str, float, Array]]:
    """OpenCV's darknet reader + the decoding OpenCV's samples do: (label, score, xyxy px)."""
    m = pkg.manifest
    net = cv2.dnn.readNetFromDarknet(str(pkg.path("config")), str(pkg.path("model")))
    blob = cv2.dnn.blobFromImage(image, 1 / 255.0, (416, 416), swapRB=True, crop=False)
    net.setInput(blob)
    out = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()), axis=0)
    h, w = image.shape[:2]
    ids = out[:, 5:].argmax(axis=1)
    scores = out[np.arange(len(out)), 5 + ids]
    keep = scores >= m.score_threshold
    xywh = out[keep, :4] * np.array([w, h, w, h])
    xywh[:, :2] -= xywh[:, 2:] / 2
    ids, scores = ids[keep], scores[keep]
    dets = []
    for label in np.unique(ids):
        idx = np.flatnonzero(ids == label)
        kept = cv2.dnn.NMSBoxes(
            xywh[idx].tolist(), scores[idx].tolist(), m.score_threshold, m.nms_threshold
        )
        for i in idx[np.ravel(kept)]:
            x, y, bw, bh = xywh[i]
            dets.append((m.labels[label], float(scores[i]), np.array([x, y, x + bw, y + bh])))
    return sorted(dets, key=lambda d: (d[0], -d[1]))


def _ours(dets: list[Detection], w: int, h: int) -> list[tuple[str, float, Array]]:
    """Detections as (label, score, xyxy in frame pixels from the normalized box)."""
    out = [
        (
            d.label,
            d.score,
            np.array([d.box.xmin * w, d.box.ymin * h, d.box.xmax * w, d.box.ymax * h]),
        )
        for d in dets
    ]
    return sorted(out, key=lambda d: (d[0], -d[1]))


def _iou(a: Array, b: Array) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return float(inter / (area - inter))


def _assert_match(
    ours: list[tuple[str, float, Array]], ref: list[tuple[str, float, Array]], min_iou: float
) -> None:
    assert [d[0] for d in ours] == [d[0] for d in ref]
    for (label, score, box), (_, ref_score, ref_box) in zip(ours, ref, strict=True):
        assert abs(score - ref_score) <= 0.02, (label, score, ref_score)
        assert _iou(box, ref_box) >= min_iou, (label, box, ref_box)


# ------------------------------------------------------------------------------ yolo


@needs_images
@pytest.mark.parametrize("image_name", IMAGES)
@pytest.mark.parametrize("key", YOLO)
def test_yolo_matches_opencv(
    packages: dict[str, Package], models: dict[str, LoadedModel], key: str, image_name: str
) -> None:
    need(packages, key)
    need(packages, "yolov3-tiny-opencv")
    image = _image(image_name)
    h, w = image.shape[:2]
    ref = _opencv_reference(packages["yolov3-tiny-opencv"], image)
    assert ref, f"OpenCV found nothing in {image_name}"
    if image_name == "dog.jpg":
        assert {"dog", "car", "truck"} <= {d[0] for d in ref}

    inf = models[key].run(image, w, h)
    _assert_match(_ours(inf.detections, w, h), ref, 0.98)
    for d in inf.detections:  # pixels are those of the frame, from the normalized box
        assert d.box.right == round(d.box.xmax * w) and d.box.bottom == round(d.box.ymax * h)
    assert inf.compute_s > 0 and inf.preprocess_s > 0 and inf.postprocess_s > 0


@needs_images
@pytest.mark.parametrize("key", ["yolov3-tiny-onnx", "yolov3-tiny-mxnet", "yolov3-tiny-torch"])
def test_yolo_reduced_scale_decode(models: dict[str, LoadedModel], key: str) -> None:
    """A JPEG decoded at 1/2 scale, with the full frame's size: boxes in full-frame pixels."""
    need(models, key)
    full = _image("dog.jpg")
    h, w = full.shape[:2]
    jpeg = encode_jpeg(full, 95)
    model = models[key]
    at_full = model.run(decode_jpeg(jpeg, 1), w, h).detections
    half = decode_jpeg(jpeg, 2)
    assert half.shape[1] < w
    at_half = model.run(half, w, h).detections
    # The labels of small objects may flip at half resolution (measured: the truck becomes
    # a second car), so match by place: every box must sit where a full-size one does.
    assert "dog" in {d.label for d in at_half}
    full_boxes = [b for _, _, b in _ours(at_full, w, h)]
    for label, _, box in _ours(at_half, w, h):
        best = max(_iou(box, b) for b in full_boxes)
        assert best >= 0.9, (label, best)
    for d in at_half:
        assert 0 <= d.box.left < d.box.right <= w and 0 <= d.box.top < d.box.bottom <= h


@needs_images
def test_onnx_yolo_through_opencv_backend(packages: dict[str, Package], tmp_path: Path) -> None:
    """The importer's ONNX file is read by OpenCV's ONNX reader too (the opset is chosen for
    both): packaged for the opencv backend, it finds what OpenCV's darknet reader finds."""
    need(packages, "yolov3-tiny-onnx")
    need(packages, "yolov3-tiny-opencv")
    src = packages["yolov3-tiny-onnx"]
    shutil.copy(src.path("model"), tmp_path / "model.onnx")
    manifest = src.manifest.model_dump(exclude={"files", "v", "framework", "version"})
    pkg = write_package(
        tmp_path, {"model": "model.onnx"}, **manifest, framework="opencv", version="cv"
    )
    model = load_model(pkg)
    model.warmup()
    for name in IMAGES:
        image = _image(name)
        h, w = image.shape[:2]
        ref = _opencv_reference(packages["yolov3-tiny-opencv"], image)
        _assert_match(_ours(model.run(image, w, h).detections, w, h), ref, 0.98)
    model.close()


@needs_images
def test_yolo_letterbox_maps_back_to_frame(packages: dict[str, Package], tmp_path: Path) -> None:
    """The same network fed letterboxed: the dog is where it is in the frame."""
    need(packages, "yolov3-tiny-onnx")
    need(packages, "yolov3-tiny-opencv")
    src = packages["yolov3-tiny-onnx"]
    m = src.manifest
    shutil.copy(src.path("model"), tmp_path / "model.onnx")
    pkg = write_package(
        tmp_path,
        {"model": "model.onnx"},
        **{
            **m.model_dump(exclude={"files", "v", "input"}),
            "input": m.input.model_copy(update={"resize": "letterbox"}),
            "version": "letterbox",
        },
    )
    image = _image("dog.jpg")  # 768x576: letterboxing pads top and bottom
    h, w = image.shape[:2]
    model = load_model(pkg)
    model.warmup()
    boxed = {d.label: d for d in model.run(image, w, h).detections}
    ref = {d[0]: d for d in _opencv_reference(packages["yolov3-tiny-opencv"], image)}
    assert "dog" in boxed
    iou = _iou(_ours([boxed["dog"]], w, h)[0][2], ref["dog"][2])
    assert iou >= 0.8, iou
    model.close()


# ------------------------------------------------------------------------------ face ssd


def test_face_ssd_finds_the_astronaut(models: dict[str, LoadedModel]) -> None:
    need(models, "face-ssd-opencv")
    image = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512
    inf = models["face-ssd-opencv"].run(image, 512, 512)
    assert len(inf.detections) == 1, inf.detections
    face = inf.detections[0]
    assert (face.label, face.class_id) == ("face", 1)
    assert face.score >= 0.9
    # measured: x 0.35-0.53, y 0.11-0.35 (Eileen Collins' face, upper middle of the photo)
    b = face.box
    assert 0.3 <= b.xmin < b.xmax <= 0.6 and 0.05 <= b.ymin < b.ymax <= 0.45, b
    assert (b.left, b.top, b.right, b.bottom) == (
        round(b.xmin * 512),
        round(b.ymin * 512),
        round(b.xmax * 512),
        round(b.ymax * 512),
    )


def test_face_ssd_no_face_in_coffee(models: dict[str, LoadedModel]) -> None:
    need(models, "face-ssd-opencv")
    image = cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR)
    assert models["face-ssd-opencv"].run(image, 600, 400).detections == []


# ------------------------------------------------------------------------------ classifier

ROTATIONS = [
    (None, "0"),
    (cv2.ROTATE_90_CLOCKWISE, "90"),
    (cv2.ROTATE_180, "180"),
    (cv2.ROTATE_90_COUNTERCLOCKWISE, "270"),
]


@pytest.fixture(scope="module")
def orientation_opencv(
    packages: dict[str, Package], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoadedModel]:
    """The same ONNX classifier packaged for OpenCV's ONNX reader."""
    need(packages, "text-orientation-onnx")
    folder = build_classifier(tmp_path_factory.mktemp("orientation"), framework="opencv")
    model = load_model(verify(folder))
    model.warmup()
    yield model
    model.close()


@pytest.mark.parametrize(("rotation", "label"), ROTATIONS)
def test_text_orientation_on_a_scanned_page(
    models: dict[str, LoadedModel],
    orientation_opencv: LoadedModel,
    rotation: int | None,
    label: str,
) -> None:
    page = cv2.cvtColor(skdata.page(), cv2.COLOR_GRAY2BGR)  # a real scanned page of text
    image = page if rotation is None else cv2.rotate(page, rotation)
    h, w = image.shape[:2]
    for model in (models["text-orientation-onnx"], orientation_opencv):
        inf = model.run(image, w, h)
        scores = [c.score for c in inf.classes]
        assert scores == sorted(scores, reverse=True)
        top = inf.classes[0]
        assert top.label == label and top.score >= 0.8, (model.manifest.framework, inf.classes)
        assert len(inf.classes) == 4
        assert abs(sum(c.score for c in inf.classes) - 1) < 1e-3
