"""Every way a model can fail to load is a ModelLoadError that names the file and the cause.

Tiny models are made here (a Gluon net exported to MXNet files, an ONNX graph built with
onnx.helper) and packaged with ``lensbus.modelpkg.write_package``, so the sha256 checks pass
and the backends see exactly the broken file the test means.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lensbus.backends import BACKENDS, parse_device
from lensbus.backends.mxnet import MXNET_INSTALL
from lensbus.modelpkg import Package, write_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.model import ModelLoadError, load_model  # noqa: E402

SIZE = 16
LABELS = ["left", "right", "other"]


def _manifest(framework: str, labels: list[str] = LABELS, size: int = SIZE) -> dict[str, Any]:
    return {
        "name": "tiny",
        "version": "1",
        "framework": framework,
        "task": "classification",
        "decoder": "classification",
        "input": {"width": size, "height": size, "scale": 1 / 255},
        "labels": labels,
        "top_k": 3,
    }


# ------------------------------------------------------------------------------ tiny models


def tiny_onnx(path: Path, initializers_as_inputs: bool = False, dense: bool = False) -> Path:
    """x (1, 3, 16, 16) -> conv -> global average pool -> flatten -> softmax (1, 3).

    ``dense``: conv -> flatten -> fully connected instead, which only runs at 16x16.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (3, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "b")
    fc = numpy_helper.from_array(rng.normal(0, 0.01, (3 * SIZE * SIZE, 3)).astype(np.float32), "fc")
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    if dense:
        nodes = [
            conv,
            helper.make_node("Flatten", ["c"], ["f0"]),
            helper.make_node("MatMul", ["f0", "fc"], ["f"]),
        ]
    else:
        nodes = [
            conv,
            helper.make_node("GlobalAveragePool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
        ]
    nodes.append(helper.make_node("Softmax", ["f"], ["y"], axis=1))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])]
    if initializers_as_inputs:  # what mxnet's exporter writes
        inputs += [
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3, 3, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[w, b, fc] if dense else [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_mxnet(folder: Path, flat: int = SIZE, classes: int = 3) -> tuple[str, str]:
    """Conv -> flatten -> dense: the dense layer fixes the input size to ``flat`` squared."""
    mx = pytest.importorskip("mxnet", reason=f"MXNet is not installed: {MXNET_INSTALL}")
    from mxnet.gluon import nn

    net = nn.HybridSequential(prefix="tiny_")
    with net.name_scope():
        net.add(nn.Conv2D(2, 3, padding=1, in_channels=3), nn.Flatten())
        net.add(nn.Dense(classes, in_units=2 * flat * flat))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, flat, flat)))
    net.export(str(folder / "tiny"), epoch=0)
    return "tiny-symbol.json", "tiny-0000.params"


def package_onnx(folder: Path, **kw: Any) -> Package:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_onnx(folder / "tiny.onnx", kw.pop("initializers_as_inputs", False))
    return write_package(folder, {"model": "tiny.onnx"}, **{**_manifest("onnx"), **kw})


def package_mxnet(folder: Path, flat: int = SIZE, **kw: Any) -> Package:
    folder.mkdir(parents=True, exist_ok=True)
    symbol, params = tiny_mxnet(folder, flat)
    files = {"symbol": symbol, "params": params}
    return write_package(folder, files, **{**_manifest("mxnet"), **kw})


def load_and_warm(pkg: Package, device: str = "cpu") -> None:
    model = load_model(pkg, device)
    try:
        model.warmup()
    finally:
        model.close()


# ------------------------------------------------------------------------------ working models


@pytest.mark.parametrize("as_inputs", [False, True])
def test_tiny_onnx_runs(tmp_path: Path, as_inputs: bool, caplog: pytest.LogCaptureFixture) -> None:
    pkg = package_onnx(tmp_path / "pkg", initializers_as_inputs=as_inputs)
    with caplog.at_level(logging.INFO, logger="lensbus.backends"):
        model = load_model(pkg)
    assert ("stripped weights" in caplog.text) == as_inputs
    model.warmup()
    inf = model.run(np.full((40, 30, 3), 90, dtype=np.uint8), 300, 400)
    assert sorted(c.label for c in inf.classes) == sorted(LABELS)
    assert sum(c.score for c in inf.classes) == pytest.approx(1.0, abs=1e-5)
    assert model.device == "cpu" and model.input_size == (SIZE, SIZE)
    model.close()


def test_tiny_mxnet_runs(tmp_path: Path) -> None:
    model = load_model(package_mxnet(tmp_path / "pkg"))
    model.warmup()
    inf = model.run(np.zeros((SIZE, SIZE, 3), dtype=np.uint8), SIZE, SIZE)
    assert len(inf.classes) == 3 and model.device == "cpu"
    model.close()


# ------------------------------------------------------------------------------ broken files


def test_corrupt_mxnet_params(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    symbol, params = tiny_mxnet(folder)
    (folder / params).write_bytes(b"\x12\x01" + bytes(range(256)) * 8)
    pkg = write_package(folder, {"symbol": symbol, "params": params}, **_manifest("mxnet"))
    with pytest.raises(ModelLoadError, match=r"tiny:1 \(tiny-0000\.params\).*params"):
        load_model(pkg)


def test_mxnet_params_of_another_model(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    symbol, params = tiny_mxnet(folder)
    other = tmp_path / "other"
    other.mkdir()
    tiny_mxnet(other, flat=8)  # same names, other dense shape
    shutil.copyfile(other / params, folder / params)
    pkg = write_package(folder, {"symbol": symbol, "params": params}, **_manifest("mxnet"))
    # Gluon loads the parameters by name; the shapes only clash on the build (the graph pass
    # and its first run), the warm-up's first step
    with pytest.raises(ModelLoadError, match=r"tiny-0000\.params.*does not run.*[Ss]hape"):
        load_and_warm(pkg)


def test_not_a_symbol_file(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    symbol, params = tiny_mxnet(folder)
    (folder / symbol).write_text('{"nodes": "no"}')
    pkg = write_package(folder, {"symbol": symbol, "params": params}, **_manifest("mxnet"))
    with pytest.raises(ModelLoadError, match=r"tiny-symbol\.json.*not an MXNet symbol"):
        load_model(pkg)


def test_truncated_onnx(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    data = tiny_onnx(folder / "tiny.onnx").read_bytes()
    (folder / "tiny.onnx").write_bytes(data[: len(data) // 2])
    pkg = write_package(folder, {"model": "tiny.onnx"}, **_manifest("onnx"))
    with pytest.raises(ModelLoadError, match=r"tiny:1 \(tiny\.onnx\).*truncated or not ONNX"):
        load_model(pkg)


def test_opencv_corrupt_caffemodel_and_unknown_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "net.caffemodel").write_bytes(b"\x08\x96\x01 not a caffe model" * 10)
    (folder / "deploy.prototxt").write_text('name: "x"\ninput: "data"\n')
    pkg = write_package(
        folder, {"model": "net.caffemodel", "config": "deploy.prototxt"}, **_manifest("opencv")
    )
    with pytest.raises(ModelLoadError, match=r"net\.caffemodel.*OpenCV cannot read it"):
        load_model(pkg)

    (folder / "graph.pb").write_bytes(b"x")
    pkg = write_package(folder, {"model": "graph.pb"}, **_manifest("opencv"))
    with pytest.raises(ModelLoadError, match=r"graph\.pb.*\.caffemodel.*not \.pb"):
        load_model(pkg)

    pkg = write_package(folder, {"model": "net.caffemodel"}, **_manifest("opencv"))
    with pytest.raises(ModelLoadError, match="needs its .prototxt as the 'config' file"):
        load_model(pkg)


# ------------------------------------------------------------------------------ wrong manifest


def test_wrong_input_size_onnx(tmp_path: Path) -> None:
    pkg = package_onnx(tmp_path / "pkg", input={"width": 32, "height": 32})
    with pytest.raises(ModelLoadError, match=r"tiny\.onnx.*\[1, 3, 16, 16\].*\(1, 3, 32, 32\)"):
        load_and_warm(pkg)


def test_wrong_input_size_mxnet(tmp_path: Path) -> None:
    pkg = package_mxnet(tmp_path / "pkg", input={"width": 24, "height": 24})
    with pytest.raises(
        ModelLoadError, match=r"tiny-0000\.params.*does not run on input \(1, 3, 24, 24\)"
    ):
        load_and_warm(pkg)


def test_wrong_input_size_opencv_fails_at_warmup(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    tiny_onnx(folder / "tiny.onnx", dense=True)
    manifest = {**_manifest("opencv"), "input": {"width": 24, "height": 24}}
    pkg = write_package(folder, {"model": "tiny.onnx"}, **manifest)
    model = load_model(pkg)  # OpenCV only finds out when it runs
    with pytest.raises(ModelLoadError, match=r"tiny\.onnx.*warm-up run failed on a 24x24 input"):
        model.warmup()


def test_label_count_mismatch_fails_at_warmup(tmp_path: Path) -> None:
    pkg = package_onnx(tmp_path / "pkg", labels=["just", "two"])
    model = load_model(pkg)
    with pytest.raises(ModelLoadError, match=r"tiny\.onnx.*decoder 'classification'.*2 labels"):
        model.warmup()


# ------------------------------------------------------------------------------ frameworks


@pytest.mark.parametrize(
    ("framework", "module", "install"),
    [("mxnet", "mxnet", "lensbus-inference[mxnet]"), ("onnx", "onnxruntime", "lensbus-inference")],
)
def test_framework_not_installed_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, framework: str, module: str, install: str
) -> None:
    """Where the framework is not installed (MXNet beside numpy 2), the error says the extra."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    roles = {"mxnet": ["symbol", "params"], "onnx": ["model"]}[framework]
    for role in roles:
        (folder / role).write_bytes(b"never read: the import fails first")
    pkg = write_package(folder, {r: r for r in roles}, **_manifest(framework))
    monkeypatch.setitem(sys.modules, module, None)  # what `import` does where it is missing
    with pytest.raises(ModelLoadError) as err:
        load_model(pkg)
    message = str(err.value)
    assert f"tiny:1: framework {framework!r} needs {module}, which is not installed" in message
    assert f"install '{install}'" in message


# ------------------------------------------------------------------------------ devices


def _has_gpu(framework: str) -> bool:
    if framework == "mxnet":
        mx = pytest.importorskip("mxnet", reason=f"MXNet is not installed: {MXNET_INSTALL}")
        return bool(mx.context.num_gpus())
    if framework == "onnx":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    if framework == "torch":
        torch = pytest.importorskip(
            "torch", reason="PyTorch is not installed: 'lensbus-inference[torch]'"
        )
        return bool(torch.cuda.is_available())
    import cv2

    return bool(cv2.cuda.getCudaEnabledDeviceCount())


@pytest.mark.parametrize("framework", sorted(BACKENDS))
def test_gpu_asked_for_without_one(tmp_path: Path, framework: str) -> None:
    if _has_gpu(framework):
        pytest.skip(f"{framework} has a GPU here")
    folder = tmp_path / "pkg"
    if framework == "mxnet":
        pkg = package_mxnet(folder)
        file = "tiny-0000.params"
    else:
        folder.mkdir()
        tiny_onnx(folder / "tiny.onnx")
        pkg = write_package(folder, {"model": "tiny.onnx"}, **_manifest(framework))
        file = "tiny.onnx"
    for device in ("gpu", "gpu:1", "cuda"):
        with pytest.raises(ModelLoadError, match=rf"{file}.*{device}.*use device 'cpu'"):
            load_model(pkg, device)


def test_device_names() -> None:
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("GPU") == ("gpu", 0)
    assert parse_device("gpu:2") == ("gpu", 2)
    assert parse_device("cuda:1") == ("gpu", 1)
    for bad in ("tpu", "gpu:x", "cpu:1", ""):
        with pytest.raises(ModelLoadError, match="device"):
            parse_device(bad)
