"""The ``torch`` backend: TorchScript and torch.export packages, through the inference service.

Tiny real models are built here (a conv net, scripted with ``torch.jit.script`` and exported
with ``torch.export``) and packaged with ``lensbus.modelpkg.write_package``; the YOLOv3-tiny
demo package for PyTorch (the darknet importer's torch target) is compared with the ONNX one
on real photos.  PyTorch runs only in the Python 3.11 environment (``lensbus-inference[torch]``):
elsewhere the tests that need it skip, saying so, and the missing-framework error is tested.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from photos import PHOTOS, THREE

from lensbus import Subjects, decode, encode
from lensbus.backends import BACKENDS
from lensbus.images import encode_jpeg
from lensbus.modelpkg import Package, verify, write_package
from lensbus.natsserver import NatsServer
from lensbus.schemas import FrameEnvelope, Manifest, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "inference"))

from lensbus_inference.model import ModelLoadError, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
LABELS = ["left", "right", "other"]
SKIP = "PyTorch is not installed here: 'lensbus-inference[torch]'"


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch", reason=SKIP)


def _manifest(**kw: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "version": "1",
        "framework": "torch",
        "task": "classification",
        "decoder": "classification",
        "input": {"width": SIZE, "height": SIZE, "scale": 1 / 255},
        "labels": LABELS,
        "top_k": 3,
        **kw,
    }


def tiny_net(torch: Any, extra_output: bool = False) -> Any:
    """x (1, 3, 16, 16) -> conv -> mean over pixels -> linear -> softmax (1, 3)."""
    nn = torch.nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        # Unannotated: TorchScript takes an unannotated argument for a Tensor.
        def forward(self, x):  # type: ignore[no-untyped-def]
            y = torch.softmax(self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))), dim=1)
            return y

    class TwoOutputs(Tiny):
        def forward(self, x):  # type: ignore[no-untyped-def]
            y = torch.softmax(self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))), dim=1)
            return y, [x.mean(dim=1)]

    torch.manual_seed(0)
    net = TwoOutputs() if extra_output else Tiny()
    return net.eval()


def save_script(torch: Any, net: Any, path: Path) -> Path:
    with warnings.catch_warnings():  # torch 2.13 marks torch.jit deprecated
        warnings.filterwarnings("ignore", ".*is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(path))
    return path


def save_export(torch: Any, net: Any, path: Path, size: int = SIZE) -> Path:
    program = torch.export.export(net, (torch.zeros(1, 3, size, size),))
    torch.export.save(program, str(path))
    return path


def package(torch: Any, folder: Path, kind: str, **kw: Any) -> Package:
    """A tiny torch package: ``kind`` ``script`` (tiny.pt) or ``export`` (tiny.pt2)."""
    folder.mkdir(parents=True, exist_ok=True)
    net = tiny_net(torch, kw.pop("extra_output", False))
    if kind == "script":
        name = save_script(torch, net, folder / "tiny.pt").name
    else:
        name = save_export(torch, net, folder / "tiny.pt2").name
    return write_package(folder, {"model": name}, **_manifest(**kw))


# ------------------------------------------------------------------------------ working models


@pytest.mark.parametrize("kind", ["script", "export"])
def test_torch_package_runs_through_loaded_model(torch: Any, tmp_path: Path, kind: str) -> None:
    pkg = package(torch, tmp_path / kind, kind)
    model = load_model(pkg)
    model.warmup()
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    inf = model.run(image, SIZE, SIZE)
    assert model.device == "cpu" and model.ref.framework == "torch"
    assert sorted(c.label for c in inf.classes) == sorted(LABELS)
    # The same numbers as the module itself, run by hand on the same input.
    x = torch.from_numpy(image[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255)
    with torch.no_grad():
        want = tiny_net(torch)(x)[0].numpy()
    got = {c.label: c.score for c in inf.classes}
    for label, score in zip(LABELS, want, strict=True):
        assert got[label] == pytest.approx(float(score), abs=1e-5)
    model.close()


def test_tuple_and_nested_outputs_come_back_in_order(torch: Any, tmp_path: Path) -> None:
    pkg = package(torch, tmp_path / "pkg", "script", extra_output=True)
    backend = BACKENDS["torch"](pkg, "cpu", None)
    x = np.random.default_rng(2).random((1, 3, SIZE, SIZE), dtype=np.float32)
    outs = backend.forward(x)
    assert [o.shape for o in outs] == [(1, 3), (1, SIZE, SIZE)]
    assert all(isinstance(o, np.ndarray) and o.dtype == np.float32 for o in outs)
    np.testing.assert_allclose(outs[1], x.mean(axis=1), rtol=1e-6)
    backend.close()


def test_threads_are_capped_and_a_second_count_does_not_fail(tmp_path: Path) -> None:
    """In a fresh process (inter-op threads can be set once per process): two models with
    different counts load; intra-op follows the last, inter-op keeps the first."""
    pytest.importorskip("torch", reason=SKIP)
    code = f"""
import sys, warnings
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "services" / "inference")!r}]
import torch
from pathlib import Path
from test_torch_backend import package
from lensbus_inference.model import load_model
root = Path({str(tmp_path)!r})
a = load_model(package(torch, root / "a", "script"), threads=1)
a.warmup()
assert (torch.get_num_threads(), torch.get_num_interop_threads()) == (1, 1), "first"
b = load_model(package(torch, root / "b", "export"), threads=2)
b.warmup()
assert (torch.get_num_threads(), torch.get_num_interop_threads()) == (2, 1), "second"
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_fp16_is_a_torch_option_and_runs_fp32_on_cpu(
    torch: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pkg = package(torch, tmp_path / "pkg", "export", precision="fp16")
    assert '"precision": "fp16"' in (pkg.root / "model.json").read_text()
    with caplog.at_level(logging.WARNING, logger="lensbus.backends"):
        model = load_model(pkg)
    assert "precision fp16 applies on a GPU only; running fp32 on cpu" in caplog.text
    model.warmup()
    out = BACKENDS["torch"](pkg, "cpu", None).forward(np.zeros((1, 3, SIZE, SIZE), np.float32))
    assert out[0].dtype == np.float32
    model.close()


def test_precision_in_the_manifest() -> None:
    """fp32 (the default) is not written, so older readers still read the package; fp16 is
    refused for frameworks that cannot run it."""
    files = {"model": {"path": "m", "sha256": "0" * 64, "size": 1}}
    plain = Manifest.model_validate({**_manifest(), "files": files})
    assert plain.precision == "fp32" and "precision" not in plain.model_dump_json()
    half = Manifest.model_validate({**_manifest(precision="fp16"), "files": files})
    assert half.model_dump()["precision"] == "fp16"
    with pytest.raises(ValueError, match=r"framework 'onnx' runs precision \['fp32'\]"):
        Manifest.model_validate({**_manifest(framework="onnx", precision="fp16"), "files": files})


# ------------------------------------------------------------------------------ broken files


def test_corrupt_and_wrong_files_name_the_file_and_cause(torch: Any, tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    data = save_script(torch, tiny_net(torch), folder / "tiny.pt").read_bytes()
    (folder / "tiny.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"tiny:1 \(tiny\.pt\): not a readable TorchScript"):
        load_model(write_package(folder, {"model": "tiny.pt"}, **_manifest()))

    torch.save(tiny_net(torch).state_dict(), folder / "weights.pt")
    with pytest.raises(ModelLoadError, match=r"weights\.pt.*state_dict is not a model"):
        load_model(write_package(folder, {"model": "weights.pt"}, **_manifest()))

    data = save_export(torch, tiny_net(torch), folder / "tiny.pt2").read_bytes()
    (folder / "tiny.pt2").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"tiny\.pt2\): not a readable torch\.export.*zip"):
        load_model(write_package(folder, {"model": "tiny.pt2"}, **_manifest()))

    (folder / "tiny.pth").write_bytes(data)
    with pytest.raises(ModelLoadError, match=r"tiny\.pth.*\(\.pt2\) files, not '\.pth'"):
        load_model(write_package(folder, {"model": "tiny.pth"}, **_manifest()))


def test_exported_input_size_is_checked_against_the_manifest(torch: Any, tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    save_export(torch, tiny_net(torch), folder / "tiny.pt2", size=24)
    pkg = write_package(folder, {"model": "tiny.pt2"}, **_manifest())
    with pytest.raises(ModelLoadError, match=r"tiny\.pt2.*\[1, 3, 24, 24\].*\(1, 3, 16, 16\)"):
        load_model(pkg)


def test_torch_not_installed_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "tiny.pt").write_bytes(b"never read: the import fails first")
    pkg = write_package(folder, {"model": "tiny.pt"}, **_manifest())
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import` does where it is missing
    with pytest.raises(ModelLoadError) as err:
        load_model(pkg)
    message = str(err.value)
    assert "tiny:1: framework 'torch' needs torch, which is not installed" in message
    assert "install 'lensbus-inference[torch]'" in message


# ------------------------------------------------------------------------------ devices


def test_gpu_asked_for_without_one(torch: Any, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("PyTorch sees a CUDA device here")
    pkg = package(torch, tmp_path / "pkg", "script")
    for device in ("gpu", "cuda:1"):
        with pytest.raises(ModelLoadError, match=rf"tiny\.pt.*{device}.*0 CUDA.*use device 'cpu'"):
            load_model(pkg, device)


@pytest.mark.parametrize("kind", ["script", "export"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_gives_the_cpu_answers(torch: Any, tmp_path: Path, kind: str, precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for PyTorch here (bench/gpu.sh runs this on one)")
    pkg = package(torch, tmp_path / "pkg", kind, precision=precision)
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    scores = []
    for device in ("cpu", "gpu"):
        model = load_model(pkg, device)
        model.warmup()
        scores.append({c.label: c.score for c in model.run(image, SIZE, SIZE).classes})
        model.close()
    assert model.device == "cuda:0"
    for label in LABELS:
        assert scores[1][label] == pytest.approx(scores[0][label], abs=2e-3)


# ------------------------------------------------------------------------------ real YOLOv3-tiny


def _detections(model: Any, names: tuple[str, ...]) -> list[list[tuple[str, float, Any]]]:
    import cv2

    out = []
    for name in names:
        image = cv2.imread(str(PHOTOS / name))
        h, w = image.shape[:2]
        dets = model.run(image, w, h).detections
        out.append(sorted((d.label, d.score, d.box) for d in dets))
    return out


@pytest.mark.slow
def test_yolov3_tiny_torch_gives_the_onnx_detections(
    torch: Any, demo_models: dict[str, Path]
) -> None:
    if not PHOTOS.is_dir():
        pytest.skip("Debian package darknet (real photos) is not installed")
    answers = []
    for key in ("yolov3-tiny-torch", "yolov3-tiny-onnx"):
        model = load_model(verify(demo_models[key]))
        model.warmup()
        answers.append(_detections(model, THREE))
        model.close()
    for torch_dets, onnx_dets in zip(*answers, strict=True):
        assert [d[0] for d in torch_dets] == [d[0] for d in onnx_dets]
        for (_, s1, b1), (_, s2, b2) in zip(torch_dets, onnx_dets, strict=True):
            assert abs(s1 - s2) <= 0.02
            assert max(abs(b1.left - b2.left), abs(b1.right - b2.right)) <= 2
            assert max(abs(b1.top - b2.top), abs(b1.bottom - b2.bottom)) <= 2
    assert sum(len(d) for d in answers[0]) >= 3


# ------------------------------------------------------------------------------ the service


@pytest.mark.slow
async def test_inference_service_serves_a_torch_package(
    torch: Any, nats: NatsServer, start_service: Any, tmp_path: Path
) -> None:
    import nats as nats_py

    pkg = package(torch, tmp_path / "pkg", "export")
    inf = start_service("inference", nats.url, model=pkg.root, cameras="torchcam", threads=1)
    inf.wait_healthy(60)
    nc = await nats_py.connect(nats.url)
    results: asyncio.Queue[Result] = asyncio.Queue()

    async def on_result(msg: Any) -> None:
        await results.put(decode(msg.data, Result))

    subjects = Subjects()
    await nc.subscribe(subjects.results("torchcam"), cb=on_result)
    await nc.flush()
    jpeg = encode_jpeg(np.full((48, 64, 3), 90, np.uint8))
    env = FrameEnvelope(
        camera="torchcam", seq=7, capture_ns=time.time_ns(), width=64, height=48, data=jpeg
    )
    await nc.publish(subjects.frames("torchcam"), encode(env))
    result = await asyncio.wait_for(results.get(), 30)
    await nc.close()
    assert result.seq == 7 and result.model.framework == "torch" and result.model.device == "cpu"
    assert sorted(c.label for c in result.classes) == sorted(LABELS)
    assert sum(c.score for c in result.classes) == pytest.approx(1.0, abs=1e-4)
    assert inf.metric("lensbus_inference_frames_processed_total") == 1
    assert inf.stop() == 0
