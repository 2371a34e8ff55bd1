"""Pure logic of preprocessing and decoders: letterbox geometry, SSD layouts, YOLO, NMS,
classification, segmentation.  No model files; outputs are made by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lensbus.backends.mxnet import MXNET_INSTALL
from lensbus.decoders import (
    ClassificationDecoder,
    SegmentationDecoder,
    SSDDecoder,
    YoloDecoder,
    decode_yolo_grid,
    nms,
)
from lensbus.errors import OutputsError
from lensbus.geometry import STRETCH, Geometry
from lensbus.schemas import InputSpec, Manifest, ModelFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.preprocess import (  # noqa: E402
    LETTERBOX_FILL,
    Preprocessor,
    letterbox_layout,
)

Array = npt.NDArray[Any]
FILE = ModelFile(path="m.onnx", sha256="0" * 64, size=1)


def manifest(decoder: str, labels: list[str], **kw: Any) -> Manifest:
    task = {"ssd": "detection", "yolo": "detection"}.get(decoder, decoder)
    fields: dict[str, Any] = {
        "name": "t",
        "version": "1",
        "framework": "onnx",
        "task": task,
        "decoder": decoder,
        "input": InputSpec(width=416, height=416),
        "labels": labels,
        "files": {"model": FILE},
    }
    return Manifest(**{**fields, **kw})


# ------------------------------------------------------------------------------ preprocess


def test_letterbox_layout_16_9_into_square() -> None:
    assert letterbox_layout(1280, 720, 416, 416) == (416, 234, 0, 91)
    assert letterbox_layout(720, 1280, 416, 416) == (234, 416, 91, 0)
    assert letterbox_layout(416, 416, 416, 416) == (416, 416, 0, 0)


def test_preprocess_values_layouts_and_colour() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    resized = cv2.resize(image, (32, 24), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    for color, layout in [("rgb", "NCHW"), ("bgr", "NCHW"), ("rgb", "NHWC")]:
        spec = InputSpec(
            width=32, height=24, layout=layout, color=color, scale=1 / 255, mean=mean, std=std
        )
        prepared = Preprocessor(spec)(image)
        ordered = resized[..., ::-1] if color == "rgb" else resized
        want = (ordered / 255 - np.array(mean)) / np.array(std)
        want = want.transpose(2, 0, 1)[None] if layout == "NCHW" else want[None]
        assert prepared.tensor.dtype == np.float32
        assert prepared.tensor.shape == Preprocessor(spec).shape == want.shape
        np.testing.assert_allclose(prepared.tensor, want, atol=1e-5)
        assert prepared.geometry == STRETCH


def test_preprocess_letterbox_pads_and_remembers() -> None:
    image = np.full((720, 1280, 3), 200, dtype=np.uint8)
    spec = InputSpec(width=416, height=416, resize="letterbox", scale=1.0)
    prepared = Preprocessor(spec)(image)
    g = prepared.geometry
    assert (g.pad_x, g.span_x) == (0.0, 1.0)
    assert g.pad_y == pytest.approx(91 / 416) and g.span_y == pytest.approx(234 / 416)
    t = prepared.tensor[0, 0]
    assert np.all(t[:91] == LETTERBOX_FILL) and np.all(t[91 + 234 :] == LETTERBOX_FILL)
    assert np.all(t[91 : 91 + 234] == 200)


def test_preprocess_refuses_non_bgr() -> None:
    pre = Preprocessor(InputSpec(width=8, height=8))
    with pytest.raises(ValueError, match="BGR uint8"):
        pre(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="BGR uint8"):
        pre(np.zeros((8, 8, 3), dtype=np.float32))


@settings(max_examples=60, deadline=None)
@given(st.integers(16, 4000), st.integers(16, 4000), st.integers(32, 640), st.integers(32, 640))
def test_letterbox_geometry_maps_the_image_onto_the_frame(
    img_w: int, img_h: int, in_w: int, in_h: int
) -> None:
    new_w, new_h, left, top = letterbox_layout(img_w, img_h, in_w, in_h)
    assert 0 <= left and left + new_w <= in_w and 0 <= top and top + new_h <= in_h
    assert new_w == in_w or new_h == in_h  # it fits one side exactly
    g = Geometry(left / in_w, top / in_h, new_w / in_w, new_h / in_h)
    # the corners of the image inside the input are the corners of the frame
    corners = np.array([[left / in_w, top / in_h, (left + new_w) / in_w, (top + new_h) / in_h]])
    np.testing.assert_allclose(g.boxes_to_frame(corners), [[0, 0, 1, 1]], atol=1e-12)
    rows, cols = g.content_slice(in_w, in_h)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (top, top + new_h, left, left + new_w)


# ------------------------------------------------------------------------------ nms


def test_nms_is_per_class_and_best_first() -> None:
    boxes = np.array(
        [
            [0.10, 0.10, 0.50, 0.50],  # A, class 0, 0.9
            [0.12, 0.11, 0.51, 0.50],  # overlaps A heavily, class 0, 0.8 -> suppressed
            [0.12, 0.11, 0.51, 0.50],  # same place, class 1 -> kept (other class)
            [0.60, 0.60, 0.90, 0.90],  # elsewhere, class 0 -> kept
        ]
    )
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    kept = nms(boxes, scores, np.array([0, 0, 1, 0]), 0.45)
    assert kept.tolist() == [3, 0, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.45).size == 0


# ------------------------------------------------------------------------------ yolo


def yolo_rows(boxes: list[tuple[float, float, float, float, int, float]], classes: int) -> Array:
    """Rows in the darknet layout from (cx, cy, w, h, class, score)."""
    rows = np.zeros((len(boxes), 5 + classes), dtype=np.float32)
    for r, (cx, cy, w, h, c, s) in zip(rows, boxes, strict=True):
        r[:5] = (cx, cy, w, h, s)
        r[5 + c] = s
    return rows


def test_yolo_threshold_nms_and_frame_pixels() -> None:
    m = manifest("yolo", ["cat", "dog"], score_threshold=0.5, nms_threshold=0.45)
    rows = yolo_rows(
        [
            (0.5, 0.5, 0.2, 0.4, 1, 0.9),
            (0.51, 0.5, 0.2, 0.4, 1, 0.6),  # same dog, lower: suppressed
            (0.2, 0.2, 0.1, 0.1, 0, 0.4),  # below threshold
            (0.8, 0.2, 0.1, 0.1, 0, 0.7),
        ],
        2,
    )
    dec = YoloDecoder(m)
    out = dec([rows[None]], STRETCH, 1920, 1080)
    assert [(d.label, d.class_id, round(d.score, 3)) for d in out.detections] == [
        ("dog", 1, 0.9),
        ("cat", 0, 0.7),
    ]
    dog = out.detections[0].box
    assert (dog.xmin, dog.ymin, dog.xmax, dog.ymax) == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert (dog.left, dog.top, dog.right, dog.bottom) == (768, 324, 1152, 756)


def test_yolo_opencv_layer_list_equals_one_output() -> None:
    m = manifest("yolo", ["a", "b", "c"])
    rng = np.random.default_rng(3)
    rows = yolo_rows(
        [
            (
                *rng.uniform(0.1, 0.9, 2),
                *rng.uniform(0.05, 0.3, 2),
                int(rng.integers(3)),
                float(rng.uniform(0.3, 1)),
            )
            for _ in range(40)
        ],
        3,
    )
    dec = YoloDecoder(m)
    one = dec([rows[None]], STRETCH, 640, 480).detections
    split = dec([rows[:25], rows[25:]], STRETCH, 640, 480).detections  # cv2.dnn darknet style
    assert one == split and one


def test_yolo_letterbox_maps_to_full_frame() -> None:
    """1280x720 frame, decoded at 1/2 scale (640x360), letterboxed into 416x416."""
    spec = InputSpec(width=416, height=416, resize="letterbox")
    g = Preprocessor(spec)(np.zeros((360, 640, 3), dtype=np.uint8)).geometry
    # a box covering the frame's right half, as the model sees it inside the letterbox
    top, span = g.pad_y, g.span_y
    rows = yolo_rows([(0.75, top + span / 2, 0.5, span, 0, 0.9)], 1)
    det = YoloDecoder(manifest("yolo", ["x"], input=spec))([rows], g, 1280, 720).detections[0]
    assert (det.box.xmin, det.box.ymin, det.box.xmax, det.box.ymax) == pytest.approx(
        (0.5, 0.0, 1.0, 1.0)
    )
    assert (det.box.left, det.box.top, det.box.right, det.box.bottom) == (640, 0, 1280, 720)


def test_yolo_box_in_the_padding_is_dropped() -> None:
    g = Geometry(0.0, 0.25, 1.0, 0.5)
    rows = yolo_rows([(0.5, 0.1, 0.2, 0.1, 0, 0.9)], 1)  # entirely in the top padding
    assert YoloDecoder(manifest("yolo", ["x"]))([rows], g, 100, 100).detections == []


def test_yolo_label_mismatch_is_an_outputs_error() -> None:
    dec = YoloDecoder(manifest("yolo", ["only-one"]))
    with pytest.raises(OutputsError, match="does not fit 1 labels"):
        dec.check([np.zeros((1, 2535, 85), dtype=np.float32)])
    with pytest.raises(OutputsError, match="no outputs"):
        dec.check([])


def test_raw_yolo_grid_matches_darknet_layer() -> None:
    """decode_yolo_grid == the darknet importer's [yolo] layer (and OpenCV's reader matches)."""
    mx = pytest.importorskip("mxnet", reason=f"MXNet is not installed: {MXNET_INSTALL}")
    from lensbus_inference.packaging.darknet_layers import DarknetYolo
    from lensbus_inference.packaging.darknet_plan import plan_yolo

    anchors = [10, 14, 23, 27, 37, 58]
    section = {
        "type": "yolo",
        "mask": "0,1,2",
        "anchors": ",".join(map(str, anchors)),
        "classes": "4",
        "num": "3",
    }
    layer = DarknetYolo(plan_yolo(section, (3 * 9, 5, 7), (160, 224)), prefix="y_")
    layer.initialize()
    raw = np.random.default_rng(5).normal(0, 2, (1, 27, 5, 7)).astype(np.float32)
    want = layer(mx.nd.array(raw)).asnumpy()[0]
    got = decode_yolo_grid(raw, anchors, 224, 160, 0.2)
    assert got.shape == want.shape == (5 * 7 * 3, 9)
    np.testing.assert_allclose(got, want, atol=1e-5)

    m = manifest(
        "yolo",
        list("abcd"),
        decoder_options={"anchors": [anchors, anchors]},
        input=InputSpec(width=224, height=160),
        score_threshold=0.3,
    )
    dec = YoloDecoder(m)
    assert np.allclose(dec.rows([raw, raw]), np.concatenate([want, want]), atol=1e-5)
    with pytest.raises(OutputsError, match="anchors for 2"):
        dec.check([raw])


# ------------------------------------------------------------------------------ ssd


def test_ssd_caffe_layout_drops_background_and_junk() -> None:
    m = manifest(
        "ssd", ["background", "face"], score_threshold=0.5, decoder_options={"layout": "caffe"}
    )
    out = np.array(
        [
            [0, 1, 0.99, 0.35, 0.11, 0.53, 0.35],  # face
            [0, 0, 0.98, 0.0, 0.0, 1.0, 1.0],  # background row: dropped
            [0, 1, 0.30, 0.1, 0.1, 0.2, 0.2],  # below threshold
            [0, 1, 0.90, 4.0, 4.0, 4.8, 4.9],  # outside the frame (res10 emits such rows)
            [0, 1, 0.70, -0.1, 0.5, 0.2, 1.2],  # partly outside: clipped
        ],
        dtype=np.float32,
    )[None, None]
    dets = SSDDecoder(m)([out], STRETCH, 512, 512).detections
    assert [(d.label, d.class_id, round(d.score, 2)) for d in dets] == [
        ("face", 1, 0.99),
        ("face", 1, 0.7),
    ]
    assert (dets[0].box.left, dets[0].box.top) == (round(0.35 * 512), round(0.11 * 512))
    clipped = dets[1].box
    assert (clipped.xmin, clipped.ymax, clipped.left, clipped.bottom) == (0.0, 1.0, 0, 512)


def test_ssd_mxnet_layout_and_labels() -> None:
    m = manifest("ssd", ["person", "car"], score_threshold=0.4, decoder_options={"layout": "mxnet"})
    out = np.array(
        [
            [1, 0.8, 0.1, 0.2, 0.3, 0.4],
            [-1, 0.99, 0.0, 0.0, 1.0, 1.0],  # -1: nothing
            [0, 0.5, 0.5, 0.5, 0.6, 0.9],
        ],
        dtype=np.float32,
    )[None]
    dets = SSDDecoder(m)([out], STRETCH, 100, 200).detections
    assert [(d.label, d.class_id) for d in dets] == [("car", 1), ("person", 0)]
    assert (dets[1].box.left, dets[1].box.top, dets[1].box.right, dets[1].box.bottom) == (
        50,
        100,
        60,
        180,
    )


def test_ssd_gluoncv_layout_boxes_in_input_pixels() -> None:
    m = manifest(
        "ssd",
        ["a", "b"],
        input=InputSpec(width=512, height=256),
        decoder_options={"layout": "gluoncv"},
    )
    ids = np.array([[[1], [-1]]], dtype=np.float32)
    scores = np.array([[[0.9], [0.9]]], dtype=np.float32)
    boxes = np.array([[[128, 64, 256, 128], [0, 0, 1, 1]]], dtype=np.float32)
    dets = SSDDecoder(m)([ids, scores, boxes], STRETCH, 1024, 512).detections
    assert len(dets) == 1 and dets[0].label == "b"
    assert (dets[0].box.left, dets[0].box.top, dets[0].box.right, dets[0].box.bottom) == (
        256,
        128,
        512,
        256,
    )


def test_ssd_shape_errors() -> None:
    m = manifest("ssd", ["bg", "x"], decoder_options={"layout": "caffe"})
    with pytest.raises(OutputsError, match="7"):
        SSDDecoder(m).check([np.zeros((1, 1, 10, 6))])
    with pytest.raises(ValidationError, match="decoder_options.layout"):
        SSDDecoder(manifest("ssd", ["x"], decoder_options={"layout": "yolo"}))


# ------------------------------------------------------------------------------ classification


def test_classification_softmax_auto_and_top_k() -> None:
    m = manifest("classification", ["a", "b", "c", "d"], top_k=2)
    logits = np.array([[1.0, 3.0, 0.5, 2.0]], dtype=np.float32)
    out = ClassificationDecoder(m)([logits], STRETCH, 10, 10).classes
    e = np.exp(logits[0] - logits.max())
    p = e / e.sum()
    assert [(c.label, c.class_id) for c in out] == [("b", 1), ("d", 3)]
    assert [c.score for c in out] == pytest.approx([p[1], p[3]], abs=1e-6)

    probs = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)  # already probabilities: kept
    out = ClassificationDecoder(m)([probs], STRETCH, 10, 10).classes
    assert [(c.label, round(c.score, 4)) for c in out] == [("d", 0.4), ("c", 0.3)]
    forced = manifest("classification", list("abcd"), decoder_options={"softmax": True})
    assert ClassificationDecoder(forced)([probs], STRETCH, 1, 1).classes[0].score < 0.4
    off = manifest("classification", list("abcd"), decoder_options={"softmax": False})
    assert ClassificationDecoder(off)([probs.reshape(1, 4, 1, 1)], STRETCH, 1, 1).classes[
        0
    ].score == pytest.approx(0.4)


def test_classification_label_count_mismatch() -> None:
    dec = ClassificationDecoder(manifest("classification", ["a", "b"]))
    with pytest.raises(OutputsError, match="1000 scores.*2 labels"):
        dec.check([np.zeros((1, 1000))])


# ------------------------------------------------------------------------------ segmentation


def test_segmentation_scores_areas_boxes_and_png() -> None:
    labels = ["background", "road", "car"]
    cmap = np.zeros((8, 10), dtype=np.int64)
    cmap[4:, :] = 1  # road: bottom half
    cmap[2:4, 6:9] = 2  # car: 2 x 3 pixels
    scores = np.eye(3, dtype=np.float32)[cmap].transpose(2, 0, 1)[None]  # (1, 3, 8, 10)
    m = manifest("segmentation", labels, decoder_options={"background_id": 0})
    out = SegmentationDecoder(m, mask_png=True)([scores], STRETCH, 1000, 800)
    segs = {s.label: s for s in out.segments}
    assert set(segs) == {"road", "car"}
    assert segs["road"].area == pytest.approx(0.5)
    assert segs["car"].area == pytest.approx(6 / 80)
    car = segs["car"].box
    assert (car.xmin, car.ymin, car.xmax, car.ymax) == pytest.approx((0.6, 0.25, 0.9, 0.5))
    assert (car.left, car.top, car.right, car.bottom) == (600, 200, 900, 400)
    assert out.mask_png is not None
    decoded = cv2.imdecode(np.frombuffer(out.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, cmap)


def test_segmentation_class_map_letterbox_cut() -> None:
    """A (1, H, W) class map from a letterboxed input: the padding rows do not count."""
    cmap = np.full((1, 16, 16), 3, dtype=np.int32)  # padding predicted as class 3
    cmap[0, 4:12] = 0
    cmap[0, 4:12, :8] = 1  # left half of the image
    g = Geometry(0.0, 0.25, 1.0, 0.5)
    out = SegmentationDecoder(manifest("segmentation", ["bg", "a", "b", "pad"]))([cmap], g, 64, 32)
    segs = {s.label: s for s in out.segments}
    assert set(segs) == {"bg", "a"} and out.mask_png is None
    assert segs["a"].area == pytest.approx(0.5)
    a = segs["a"].box
    assert (a.left, a.top, a.right, a.bottom) == (0, 0, 32, 32)


def test_segmentation_errors() -> None:
    dec = SegmentationDecoder(manifest("segmentation", ["a", "b"]))
    with pytest.raises(OutputsError, match="3 score channels but 2 labels"):
        dec.check([np.zeros((1, 3, 4, 4))])
    with pytest.raises(OutputsError, match="8-bit PNG"):
        SegmentationDecoder(manifest("segmentation", [str(i) for i in range(300)]), mask_png=True)
