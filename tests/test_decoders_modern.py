"""The modern detector families' decoders against real models and their packages' own code.

``yolov8``: NudeNet 3.4's YOLOv8n (PyPI ``nudenet``); ``yolox``: ddddocr 1.6's YOLOX (PyPI
``ddddocr``).  Each reference is the package's own preprocessing, ONNX session and
post-processing, imported and called (NudeNet's ``_postprocess`` rounds boxes down to whole
pixels, so its float boxes are recomputed here from its code and checked against it).  Two
checks per model: the decoder alone, on the very outputs the package decoded (its
bottom-right padding given as the geometry), and the whole lensbus path (``load_model``:
preprocessing, backend, decoder) on the photos.  No package ships a YOLOv5 or DETR ONNX:
those families have no decoder (see ``lensbus_inference.packaging.zoo_packages``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from models_fixture import models_dir
from skimage import data as skdata

from lensbus.decoders import DECODERS, decoder_for
from lensbus.errors import OutputsError
from lensbus.geometry import Geometry
from lensbus.modelpkg import Package, verify
from lensbus.schemas import Detection, Manifest
from lensbus_inference.model import LoadedModel, load_model
from lensbus_inference.packaging.folders import MissingAssetError
from lensbus_inference.packaging.zoo_packages import build_yolov8, build_yolox

Array = npt.NDArray[Any]
Found = list[tuple[str, float, Array]]  # (label, score, xyxy in frame pixels)
PHOTOS = Path("/usr/share/darknet/data")


def _photo(name: str) -> Array:
    if name == "astronaut":
        return cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512
    if not PHOTOS.is_dir():
        pytest.skip("needs darknet's sample photos (Debian package darknet)")
    image = cv2.imread(str(PHOTOS / name))
    assert image is not None, name
    return image


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package | str]:
    out: dict[str, Package | str] = {}
    for key, builder in (("yolov8", build_yolov8), ("yolox", build_yolox)):
        try:
            out[key] = verify(builder(models_dir(tmp_path_factory)))
        except MissingAssetError as exc:
            out[key] = str(exc)
    return out


def _package(built: dict[str, Package | str], key: str) -> Package:
    pkg = built[key]
    if isinstance(pkg, str):
        pytest.skip(f"weights not installed: {pkg}")
    return pkg


@pytest.fixture(scope="module")
def loaded(built: dict[str, Package | str]) -> Any:
    models: dict[str, LoadedModel] = {}
    for key, pkg in built.items():
        if isinstance(pkg, Package):
            models[key] = load_model(pkg, "cpu")
            models[key].warmup()  # checks the outputs fit the decoder
    yield models
    for m in models.values():
        m.close()


# ------------------------------------------------------------------------------ references


def _nudenet(image: Array) -> tuple[Found, list[Array], Geometry]:
    """NudeNet's own pipeline: (detections, the raw outputs, where the image lay)."""
    from nudenet import NudeDetector
    from nudenet import nudenet as nn

    labels = getattr(nn, "__labels")  # noqa: B009 (a module-level dunder name)
    detector = NudeDetector()
    blob, x_ratio, y_ratio, x_pad, y_pad, w, h = nn._read_image(image, detector.input_width)
    outputs = detector.onnx_session.run(None, {detector.input_name: blob})
    theirs = nn._postprocess(outputs, x_pad, y_pad, x_ratio, y_ratio, w, h, 320, 320)
    # _postprocess's own arithmetic, without its final int(): rows, score >= 0.2, scaled
    # back to the padded square, clipped to the image, one NMS (0.25, 0.45) over all classes.
    rows = outputs[0][0].T.astype(np.float64)
    ids, scores = rows[:, 4:].argmax(axis=1), rows[:, 4:].max(axis=1)
    keep = scores >= 0.2
    rows, ids, scores = rows[keep], ids[keep], scores[keep]
    size = np.array([w + x_pad, h + y_pad, w + x_pad, h + y_pad]) / 320
    xywh = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, 2:4]], axis=1) * size
    xywh[:, 0] = np.clip(xywh[:, 0], 0, w)
    xywh[:, 1] = np.clip(xywh[:, 1], 0, h)
    xywh[:, 2] = np.minimum(xywh[:, 2], w - xywh[:, 0])
    xywh[:, 3] = np.minimum(xywh[:, 3], h - xywh[:, 1])
    kept = np.ravel(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.25, 0.45))
    found = [(labels[ids[i]], float(scores[i]), _xyxy(xywh[i])) for i in kept]
    # ... and it is what NudeNet itself answers, but for the rounding down
    assert [(d["class"], d["score"]) for d in theirs] == [
        (f[0], pytest.approx(f[1])) for f in found
    ]
    for d, f in zip(theirs, found, strict=True):
        assert np.abs(np.array(d["box"]) - np.floor(_xywh(f[2]))).max() <= 1, (d, f)
    side = max(w, h)
    return found, outputs, Geometry(0.0, 0.0, w / side, h / side)


def _ddddocr(image: Array) -> tuple[Found, list[Array], Geometry]:
    """ddddocr's own pipeline (DetectionEngine.get_bbox, keeping the scores it drops)."""
    from ddddocr.core.detection_engine import DetectionEngine

    engine = DetectionEngine()
    tensor, ratio = engine.preproc(image, (416, 416))
    outputs = engine.session.run(None, {engine.session.get_inputs()[0].name: tensor[None]})
    pred = engine.demo_postprocess(outputs[0].copy(), (416, 416))[0]
    boxes, scores = pred[:, :4], pred[:, 4:5] * pred[:, 5:]
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    dets = engine.multiclass_nms(xyxy / ratio, scores, nms_thr=0.45, score_thr=0.1)
    found = [] if dets is None else [("target", float(d[4]), d[:4]) for d in dets]
    # ... and it is what ddddocr itself answers (whole pixels, clipped at 0)
    ok, png = cv2.imencode(".png", image)
    expected = [[max(0, int(v)) for v in f[2]] for f in found]
    assert engine.get_bbox(png.tobytes()) == expected
    h, w = image.shape[:2]
    return found, outputs, Geometry(0.0, 0.0, w * ratio / 416, h * ratio / 416)


def _as_resized(found: Found, image: Array) -> Found:
    """ddddocr's boxes mapped back with the size its image was really resized to.

    ddddocr resizes to ``int(w * r) x int(h * r)`` but divides boxes by ``r``: ``y`` on
    kite.jpg (900 rows -> 276, not 276.9) comes back 0.33% short.  lensbus maps with the
    size it resized to, the exact inverse of the resize.
    """
    h, w = image.shape[:2]
    r = min(416 / h, 416 / w)
    fix = np.array([r * w / int(w * r), r * h / int(h * r)] * 2)
    return [(label, score, box * fix) for label, score, box in found]


REFERENCES = {"yolov8": _nudenet, "yolox": _ddddocr}
# (model, photo, how many the package finds there): letterboxed photos and a square one;
# NudeNet finds nothing in dog.jpg, and neither may we.
CASES = [
    ("yolov8", "person.jpg", 1),
    ("yolov8", "astronaut", 1),
    ("yolov8", "dog.jpg", 0),
    ("yolox", "dog.jpg", 6),
    ("yolox", "kite.jpg", 2),
    ("yolox", "astronaut", 1),
]


def _xyxy(xywh: Array) -> Array:
    return np.array([xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]])


def _xywh(xyxy: Array) -> Array:
    return np.array([xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]])


def _ours(dets: list[Detection], w: int, h: int) -> Found:
    scale = np.array([w, h, w, h])
    return [
        (d.label, d.score, np.array([d.box.xmin, d.box.ymin, d.box.xmax, d.box.ymax]) * scale)
        for d in dets
    ]


def _iou(a: Array, b: Array) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return float(inter / (area - inter))


def _assert_match(ours: Found, ref: Found) -> None:
    def order(found: Found) -> Found:
        return sorted(found, key=lambda d: (d[0], -d[1]))

    ours, ref = order(ours), order(ref)
    assert [d[0] for d in ours] == [d[0] for d in ref], (ours, ref)
    for (label, score, box), (_, ref_score, ref_box) in zip(ours, ref, strict=True):
        assert abs(score - ref_score) <= 0.02, (label, score, ref_score)
        assert _iou(box, ref_box) >= 0.98, (label, box, ref_box)


# ------------------------------------------------------------------------------ real models


@pytest.mark.parametrize(("key", "name", "count"), CASES)
def test_decoder_matches_the_package_on_its_own_outputs(
    built: dict[str, Package | str], key: str, name: str, count: int
) -> None:
    pkg = _package(built, key)
    image = _photo(name)
    h, w = image.shape[:2]
    ref, outputs, geometry = REFERENCES[key](image)
    assert len(ref) == count, ref
    decoded = decoder_for(pkg.manifest)(outputs, geometry, w, h)
    _assert_match(_ours(decoded.detections, w, h), ref)


@pytest.mark.slow
@pytest.mark.parametrize(("key", "name", "count"), CASES)
def test_loaded_model_gives_the_packages_answers(
    built: dict[str, Package | str],
    loaded: dict[str, LoadedModel],
    key: str,
    name: str,
    count: int,
) -> None:
    """Preprocessing (top-left letterbox, colour, scale) + ONNX Runtime + decoder."""
    _package(built, key)
    image = _photo(name)
    h, w = image.shape[:2]
    ref, _, _ = REFERENCES[key](image)
    assert len(ref) == count, ref
    if key == "yolox":
        ref = _as_resized(ref, image)
    _assert_match(_ours(loaded[key].run(image, w, h).detections, w, h), ref)


def test_the_packages_say_what_they_are(built: dict[str, Package | str]) -> None:
    from nudenet import nudenet as nn

    yolov8, yolox = _package(built, "yolov8").manifest, _package(built, "yolox").manifest
    # labels from the ONNX metadata, in the order NudeNet's own list has them
    assert yolov8.labels == getattr(nn, "__labels")  # noqa: B009
    assert (yolov8.decoder, yolox.decoder) == ("yolov8", "yolox")
    assert yolov8.input.resize == yolox.input.resize == "letterbox_top_left"


# ------------------------------------------------------------------------------ shapes, logic


def _manifest(decoder: str, labels: int, size: int = 64, **options: Any) -> Manifest:
    return Manifest.model_validate(
        {
            "name": "synthetic",
            "version": "1",
            "framework": "onnx",
            "task": "detection",
            "decoder": decoder,
            "input": {"width": size, "height": size},
            "labels": [f"c{i}" for i in range(labels)],
            "score_threshold": 0.5,
            "decoder_options": options,
            "files": {"model": {"path": "m.onnx", "sha256": "0" * 64, "size": 1}},
        }
    )


def _v8_rows() -> Array:
    """Three boxes in a 64x64 input, 3 classes: two overlapping (classes 0, 1), one apart."""
    rows = np.zeros((10, 7), dtype=np.float32)
    rows[0] = [20, 20, 20, 20, 0.9, 0.1, 0.0]
    rows[1] = [21, 21, 20, 20, 0.0, 0.8, 0.0]
    rows[2] = [50, 50, 10, 10, 0.0, 0.0, 0.7]
    return rows


def test_yolov8_reads_columns_and_rows_alike() -> None:
    decoder = decoder_for(_manifest("yolov8", 3))
    rows = _v8_rows()
    a = decoder([rows.T[None]], Geometry(), 64, 64).detections
    b = decoder([rows[None]], Geometry(), 64, 64).detections
    assert [(d.label, d.box.left, d.box.top) for d in a] == [("c0", 10, 10), ("c1", 11, 11)] + [
        ("c2", 45, 45)
    ]
    assert a == b
    with pytest.raises(OutputsError, match=r"\(1, 7, N\)"):
        decoder.check([np.zeros((1, 8, 100), np.float32)])
    rows_only = decoder_for(_manifest("yolov8", 3, layout="rows"))
    with pytest.raises(OutputsError):
        rows_only.check([rows.T[None]])


def test_yolov8_agnostic_nms_suppresses_across_classes() -> None:
    decoder = decoder_for(_manifest("yolov8", 3, agnostic_nms=True))
    dets = decoder([_v8_rows().T[None]], Geometry(), 64, 64).detections
    assert [d.label for d in dets] == ["c0", "c2"]


def test_yolox_raw_grid_and_decoded_rows_agree() -> None:
    """A 64x64 input: 8x8 + 4x4 + 2x2 cells; one raw row decoded by hand."""
    raw = np.full((84, 7), -10.0, dtype=np.float32)
    raw[:, 4:] = 0.0
    i = 8 * 8 + 1 * 4 + 2  # stride 16, cell (gx=2, gy=1)
    raw[i] = [0.5, 0.25, np.log(2.0), np.log(1.0), 0.9, 0.1, 0.95]
    got = decoder_for(_manifest("yolox", 2))([raw[None]], Geometry(), 64, 64).detections
    # cx = (0.5 + 2) * 16 = 40, cy = (0.25 + 1) * 16 = 20, w = 32, h = 16; score 0.9 * 0.95
    assert [(d.label, d.box.left, d.box.top, d.box.right, d.box.bottom) for d in got] == [
        ("c1", 24, 12, 56, 28)
    ]
    assert got[0].score == pytest.approx(0.855, abs=1e-6)
    decoded = raw.copy()
    decoded[i, :4] = [40, 20, 32, 16]
    same = decoder_for(_manifest("yolox", 2, decoded=True))([decoded[None]], Geometry(), 64, 64)
    (det,) = same.detections
    assert det.box.model_dump() == pytest.approx(got[0].box.model_dump())
    assert (det.label, det.score) == (got[0].label, got[0].score)
    with pytest.raises(OutputsError, match="84 grid cells"):
        decoder_for(_manifest("yolox", 2)).check([raw[None, :80]])


def test_letterbox_top_left_maps_boxes_back_to_the_frame() -> None:
    """A 200x100 frame in a 64x64 input, top-left: the image spans 64x32 at (0, 0)."""
    from lensbus_inference.preprocess import Preprocessor

    manifest = _manifest("yolov8", 1)
    spec = manifest.input.model_copy(update={"resize": "letterbox_top_left"})
    prepared = Preprocessor(spec)(np.full((100, 200, 3), 255, dtype=np.uint8))
    assert prepared.geometry == Geometry(0.0, 0.0, 1.0, 0.5)
    assert prepared.tensor[0, 0, 31, 63] == 255 and prepared.tensor[0, 0, 32, 0] == 127
    # a box at input pixels (16..48, 8..24) is frame pixels (50..150, 25..75)
    row = np.array([[32, 16, 32, 16, 0.9]], dtype=np.float32)
    (det,) = decoder_for(manifest)([row.T[None]], prepared.geometry, 200, 100).detections
    assert (det.box.left, det.box.top, det.box.right, det.box.bottom) == (50, 25, 150, 75)


def test_options_are_typed() -> None:
    assert {"yolov8", "yolox"} <= set(DECODERS)
    with pytest.raises(ValueError, match="strides"):
        _manifest("yolox", 2, strides=[])
    with pytest.raises(ValueError, match="layout"):
        _manifest("yolov8", 2, layout="sideways")


def test_pad_value_is_written_only_when_it_is_not_the_default() -> None:
    """model.json from today stays readable by instances that refuse unknown keys."""
    from lensbus.schemas import InputSpec

    assert "pad_value" not in InputSpec(width=8, height=8).model_dump_json()
    spec = InputSpec(width=8, height=8, resize="letterbox_top_left", pad_value=0)
    assert InputSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValueError, match="pad_value"):
        InputSpec(width=8, height=8, pad_value=256)
