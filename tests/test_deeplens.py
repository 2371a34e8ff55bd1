"""DeepLens compatibility (lensbus.projects.deeplens): a DeepLens inference function's device
library over lensbus.

Real parts: the YOLOv3-tiny ONNX and text-orientation demo packages, darknet's dog.jpg, a real
nats-server. ``awscam.Model`` + ``parseResult('ssd')`` must put the dog, bicycle and truck
where lensbus's own backend and decoder put them (the reference below preprocesses with
OpenCV's blobFromImage, not with the compatibility layer's code); greengrasssdk's publish and
the local display's FIFO writes must arrive on NATS as ProjectMessage and FrameEnvelope.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import nats as nats_py
import numpy as np
import pytest
from photos import PHOTOS
from prometheus_client import REGISTRY

from lensbus import Subjects, decode
from lensbus.backends import BACKENDS
from lensbus.decoders import decoder_for
from lensbus.geometry import STRETCH
from lensbus.modelpkg import verify
from lensbus.natsserver import NatsServer
from lensbus.projects.control import ENV_MODELS
from lensbus.projects.deeplens import (
    FunctionStopped,
    awscam,
    greengrasssdk,
    mo,
    run_function,
    runtime,
)
from lensbus.projects.deeplens.parse import ResultParser
from lensbus.schemas import FrameEnvelope
from lensbus.schemas.manifest import Manifest
from lensbus.schemas.project import ProjectMessage

PROJECT = "dl-test"
CAM = "cam1"
SUBJECTS = Subjects("lensbus")


def dog() -> np.ndarray:
    path = PHOTOS / "dog.jpg"
    if not path.is_file():
        pytest.skip("Debian package darknet (real photos) is not installed")
    image = cv2.imread(str(path))
    assert image is not None
    return image


class LoopBridge:
    """A Bridge over a real NATS connection, as the host gives one: frames are fed by the
    test, publish hands bytes to a private event loop thread."""

    def __init__(self, url: str, models_dir: str = "") -> None:
        self.project, self.version, self.subjects = PROJECT, "1", SUBJECTS
        self.models_dir = models_dir
        self.frames: queue.Queue[FrameEnvelope] = queue.Queue()
        self._stop = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.nc = self._call(nats_py.connect(url))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def newest_frame(self, after_seq: int, timeout_s: float) -> FrameEnvelope | None:
        newest = None
        try:
            newest = self.frames.get(timeout=timeout_s)
            while True:
                newest = self.frames.get_nowait()
        except queue.Empty:
            pass
        if newest is None or self._stop.is_set() or newest.seq <= after_seq:
            return None
        return newest

    def publish(self, subject: str, data: bytes) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.publish(subject, data), self.loop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._call(self.nc.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def envelope(image: np.ndarray, seq: int) -> FrameEnvelope:
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    h, w = image.shape[:2]
    return FrameEnvelope(
        camera=CAM, seq=seq, capture_ns=time.time_ns(), width=w, height=h, data=jpeg.tobytes()
    )


@pytest.fixture
def installed(nats: NatsServer) -> Iterator[LoopBridge]:
    bridge = LoopBridge(nats.url)
    runtime.install(bridge)
    yield bridge
    bridge.close()
    runtime.uninstall()


# ------------------------------------------------------------------------- awscam.Model


def reference_detections(package_root: Path, image: np.ndarray, threshold: float) -> list[Any]:
    """lensbus's own reading of the image: backend + decoder on OpenCV's blob of the frame."""
    pkg = verify(package_root)
    spec = pkg.manifest.input
    assert spec.resize == "stretch" and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1, 1, 1)
    blob = cv2.dnn.blobFromImage(
        image, spec.scale, (spec.width, spec.height), swapRB=spec.color == "rgb"
    )
    outputs = BACKENDS[pkg.manifest.framework](pkg, "cpu", None).forward(blob)
    decoder = decoder_for(pkg.manifest.model_copy(update={"score_threshold": threshold}))
    h, w = image.shape[:2]
    return decoder(outputs, STRETCH, w, h).detections


def test_ssd_boxes_where_lensbus_puts_them(demo_models: dict[str, Path]) -> None:
    root = demo_models["yolov3-tiny-onnx"]
    frame = dog()
    model = awscam.Model(str(root), {"GPU": 1})  # no GPU here: the CPU, said in the log
    w, h = model.manifest.input.width, model.manifest.input.height
    raw = model.doInference(cv2.resize(frame, (w, h)))
    assert all(v.ndim == 1 and v.dtype == np.float32 for v in raw.values())  # flat, as DLDT
    parsed = model.parseResult("ssd", raw)
    assert list(parsed) == ["ssd"]
    found = parsed["ssd"]
    probs = [o["prob"] for o in found]
    assert probs == sorted(probs, reverse=True)
    assert all(set(o) == {"label", "prob", "xmin", "ymin", "xmax", "ymax"} for o in found)
    assert all(isinstance(o["label"], int) and isinstance(o["xmin"], int) for o in found)
    # in model-input pixels, as DeepLens gave them
    assert all(0 <= o["xmin"] < o["xmax"] <= w and 0 <= o["ymin"] < o["ymax"] <= h for o in found)

    labels = model.manifest.labels
    threshold = 0.25  # the sample function's
    xscale, yscale = frame.shape[1] / w, frame.shape[0] / h
    mine = {
        labels[o["label"]]: (
            xscale * o["xmin"],
            yscale * o["ymin"],
            xscale * o["xmax"],
            yscale * o["ymax"],
        )
        for o in reversed(found)  # the best of a label wins
        if o["prob"] > threshold
    }
    ref = {d.label: d for d in reversed(reference_detections(root, frame, threshold))}
    assert {"dog", "bicycle", "truck"} <= set(mine)
    assert set(mine) == set(ref)
    for label, (x0, y0, x1, y1) in mine.items():
        b = ref[label].box
        # whole input pixels scaled back: at most ~1 input pixel (x1.85 here) apart
        assert np.allclose((x0, y0, x1, y1), (b.left, b.top, b.right, b.bottom), atol=4), label


def test_classification_shape(demo_models: dict[str, Path]) -> None:
    root = demo_models["text-orientation-onnx"]
    model = awscam.Model(str(root / "model.json"), {"GPU": 0})  # a file in the package works
    spec = model.manifest.input
    image = cv2.resize(dog(), (spec.width, spec.height))
    parsed = model.parseResult("classification", model.doInference(image))
    classes = parsed["classification"]
    assert sorted(o["label"] for o in classes) == list(range(len(model.manifest.labels)))
    probs = [o["prob"] for o in classes]
    assert probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1.0) < 1e-3
    # the same best class as lensbus's own decoder on OpenCV's blob
    pkg = verify(root)
    blob = cv2.dnn.blobFromImage(image, spec.scale, (spec.width, spec.height))
    blob = (blob - np.array(spec.mean, np.float32).reshape(1, 3, 1, 1)) / np.array(
        spec.std, np.float32
    ).reshape(1, 3, 1, 1)
    outputs = BACKENDS["onnx"](pkg, "cpu", None).forward(blob.astype(np.float32))
    best = decoder_for(pkg.manifest)(outputs, STRETCH, 10, 10).classes[0]
    assert classes[0]["label"] == best.class_id
    assert abs(classes[0]["prob"] - best.score) < 1e-3
    with pytest.raises(ValueError, match="classification model; use 'classification'"):
        model.parseResult("ssd", model.doInference(image))
    with pytest.raises(ValueError, match="model_type is one of"):
        model.parseResult("yolo", {})


def test_segmentation_shape() -> None:
    """Pure logic: a class map -> one dict per class present, largest first."""
    manifest = Manifest.model_validate(
        {
            "name": "seg",
            "version": "1",
            "framework": "onnx",
            "task": "segmentation",
            "decoder": "segmentation",
            "input": {"width": 8, "height": 4},
            "labels": ["background", "road", "car"],
            "decoder_options": {"background_id": 0},
            "files": {"model": {"path": "m.onnx", "sha256": "0" * 64, "size": 1}},
        }
    )
    cmap = np.zeros((1, 4, 8))
    cmap[0, :, :4] = 1  # road: the left half
    cmap[0, 1:3, 5:7] = 2  # car: a 2x2 block
    parsed = ResultParser(manifest)("segmentation", [cmap])["segmentation"]
    assert parsed == [
        {"label": 1, "prob": 0.5, "xmin": 0, "ymin": 0, "xmax": 4, "ymax": 4},
        {"label": 2, "prob": 0.125, "xmin": 5, "ymin": 1, "xmax": 7, "ymax": 3},
    ]


def test_model_path_that_is_no_package(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no lensbus model package"):
        awscam.Model(str(tmp_path / "ssd_mobilenet_v2_coco.xml"), {"GPU": 1})


# ------------------------------------------------------------------------------------- mo


def test_mo_optimize_finds_the_projects_models(
    demo_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "yolov3-tiny-onnx-1").symlink_to(demo_models["yolov3-tiny-onnx"])
    monkeypatch.setenv(ENV_MODELS, str(models))
    for name in ("yolov3-tiny-onnx", "yolov3-tiny-onnx:1"):
        error, path = mo.optimize(name, 416, 416)
        assert (error, path) == (0, str(models / "yolov3-tiny-onnx-1"))
    assert awscam.Model(path).manifest.name == "yolov3-tiny-onnx"
    error, reason = mo.optimize("ssd_mobilenet_v2_coco", 300, 300)
    assert error == 2
    assert "'ssd_mobilenet_v2_coco'" in reason and "yolov3-tiny-onnx-1" in reason
    assert mo.optimize("yolov3-tiny-onnx:2", 416, 416)[0] == 2


# -------------------------------------------------------------------- greengrasssdk on NATS


async def test_greengrass_publish_is_a_project_message(installed: LoopBridge) -> None:
    nc = await nats_py.connect(installed.nc.connected_url.geturl())
    sub = await nc.subscribe(SUBJECTS.project_all(PROJECT))
    await nc.flush()
    client = greengrasssdk.client("iot-data")
    # before the first frame the camera is not known: held, sent with the first frame's
    client.publish(topic="$aws/things/dl-test/infer", payload="Loading object detection model")
    runtime.STATE.saw(CAM, 7, 1234)
    client.publish(topic="$aws/things/dl-test/infer", payload=json.dumps({"dog": 0.83}))
    client.publish(topic="alerts/dogs", payload=b"\xff\x00")
    got = [await sub.next_msg(timeout=10) for _ in range(3)]
    await nc.close()
    subjects = [m.subject for m in got]
    assert subjects == [
        SUBJECTS.project_output(PROJECT, CAM, "infer"),
        SUBJECTS.project_output(PROJECT, CAM, "infer"),
        SUBJECTS.project_output(PROJECT, CAM, "dogs"),
    ]
    held, dogs, raw = (decode(m.data, ProjectMessage) for m in got)
    assert held.payload == "Loading object detection model" and held.seq == 0
    assert dogs.payload == {"dog": 0.83}
    assert (dogs.project, dogs.version, dogs.camera) == (PROJECT, "1", CAM)
    assert (dogs.topic, dogs.seq, dogs.capture_ns) == ("$aws/things/dl-test/infer", 7, 1234)
    assert raw.payload == b"\xff\x00" and raw.topic == "alerts/dogs"
    with pytest.raises(ValueError, match="only 'iot-data'"):
        greengrasssdk.client("lambda")


class ListBridge:
    """A bridge without NATS: frames given in order, what is published kept."""

    def __init__(self, frames: list[FrameEnvelope]) -> None:
        self.project, self.version, self.subjects, self.models_dir = PROJECT, "1", SUBJECTS, ""
        self.frames = frames
        self.sent: list[tuple[str, bytes]] = []
        self.stopping = False

    def newest_frame(self, after_seq: int, timeout_s: float) -> FrameEnvelope | None:
        later = [f for f in self.frames if f.seq > after_seq]
        return later[0] if later else None

    def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))


def rejected(reason: str) -> float:
    value = REGISTRY.get_sample_value("lensbus_deeplens_rejected_total", {"reason": reason})
    return value or 0.0


def test_bad_input_is_counted_and_skipped(tmp_path: Path) -> None:
    good = envelope(np.full((48, 64, 3), 200, np.uint8), 2)
    corrupt = good.model_copy(update={"seq": 1, "data": good.data[:40]})
    bridge = ListBridge([corrupt, good])
    runtime.install(bridge)
    try:
        before = rejected("corrupt_frame"), rejected("display_not_jpeg")
        ok, frame = awscam.getLastFrame()  # the corrupt frame is skipped, not (False, None)
        assert ok and frame.shape == (48, 64, 3) and runtime.STATE.seq == 2
        assert (runtime.STATE.frames, runtime.STATE.skipped) == (1, 1)
        with open("/tmp/lensbus-test-display.mjpeg", "wb") as fifo:
            fifo.write(b"\xff\xd8 not a JPEG at all \xff\xd9")
        assert not Path("/tmp/lensbus-test-display.mjpeg").exists()
        assert bridge.sent == []
        assert (rejected("corrupt_frame"), rejected("display_not_jpeg")) == (
            before[0] + 1,
            before[1] + 1,
        )
        bridge.stopping = True
        with pytest.raises(FunctionStopped):
            awscam.getLastFrame()
    finally:
        runtime.uninstall()
    assert builtins.open is io.open  # the interception is undone


# ------------------------------------------------------ the local display, a whole function

FUNCTION = """
import json, os
from threading import Event, Thread
import awscam, cv2, greengrasssdk, numpy as np

class LocalDisplay(Thread):
    def __init__(self):
        super().__init__()
        self.frame = cv2.imencode('.jpg', 255 * np.ones([64, 48, 3], np.uint8))[1]
        self.stop_request = Event()
    def run(self):
        result_path = '/tmp/results.mjpeg'
        if not os.path.exists(result_path):
            os.mkfifo(result_path)
        with open(result_path, 'w') as fifo_file:
            while not self.stop_request.is_set():
                fifo_file.write(self.frame.tobytes())
    def set_frame_data(self, frame):
        self.frame = cv2.imencode('.jpg', frame)[1]

def infinite_infer_run():
    client = greengrasssdk.client('iot-data')
    topic = '$aws/things/{}/infer'.format(os.environ['AWS_IOT_THING_NAME'])
    display = LocalDisplay()
    display.start()
    try:
        while True:
            ret, frame = awscam.getLastFrame()
            if not ret:
                raise Exception('Failed to get frame from the stream')
            cv2.rectangle(frame, (10, 10), (110, 110), (0, 0, 255), -1)
            display.set_frame_data(frame)
            client.publish(topic=topic, payload=json.dumps({'shape': list(frame.shape)}))
    except Exception as ex:
        client.publish(topic=topic, payload='Error: {}'.format(ex))

infinite_infer_run()
"""


async def test_function_draws_onto_the_project_stream(nats: NatsServer, tmp_path: Path) -> None:
    script = tmp_path / "function.py"
    script.write_text(FUNCTION)
    bridge = LoopBridge(nats.url)
    nc = await nats_py.connect(nats.url)
    frames = await nc.subscribe(SUBJECTS.project_frame(PROJECT, CAM))
    infer = await nc.subscribe(SUBJECTS.project_output(PROJECT, CAM, "infer"))
    await nc.flush()
    errors: list[BaseException] = []
    fifo_existed = Path("/tmp/results.mjpeg").exists()

    def run() -> None:
        try:
            run_function(script, bridge)
        except BaseException as exc:  # the test fails on it below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        image = np.full((240, 320, 3), 90, np.uint8)
        for seq in (1, 2):
            bridge.frames.put(envelope(image, seq))
            drawn = decode((await frames.next_msg(timeout=15)).data, FrameEnvelope)
            if seq == 1 and (drawn.width, drawn.height) == (48, 64):
                # The start-up canvas, when the display thread first wrote after the first
                # camera frame came (a busy box): DeepLens showed it too, then the drawing.
                drawn = decode((await frames.next_msg(timeout=15)).data, FrameEnvelope)
            msg = decode((await infer.next_msg(timeout=15)).data, ProjectMessage)
            assert (drawn.camera, drawn.seq, drawn.width, drawn.height) == (CAM, seq, 320, 240)
            pixels = cv2.imdecode(np.frombuffer(drawn.data, np.uint8), cv2.IMREAD_COLOR)
            assert pixels[60, 60].tolist()[2] > 200 and pixels[60, 60].tolist()[0] < 60  # red
            assert pixels[200, 200].tolist()[2] < 120  # untouched grey
            assert msg.payload == {"shape": [240, 320, 3]} and msg.seq == seq
        # the display loop writes the same JPEG again and again: nothing more is sent
        with pytest.raises(TimeoutError):
            await frames.next_msg(timeout=0.5)
        # the FIFO was never made: the writes went to NATS
        assert fifo_existed or not Path("/tmp/results.mjpeg").exists()
    finally:
        bridge.stop()
        await asyncio.to_thread(thread.join, 10)
        await nc.close()
        bridge.close()
        runtime.uninstall()
    assert not thread.is_alive() and not errors
    # the function's display thread ended too: its next write raised FunctionStopped
    for t in threading.enumerate():
        if type(t).__name__ == "LocalDisplay":
            await asyncio.to_thread(t.join, 5)
            assert not t.is_alive()


def test_project_folder_is_as_a_deeplens_owner_has_it(tmp_path: Path) -> None:
    """The sample project: project.json and a function that compiles, with its models."""
    from lensbus.projects.package import check

    folder = Path(__file__).resolve().parents[1] / "projects" / "deeplens-object-detection"
    copy = tmp_path / "p"
    shutil.copytree(folder, copy)
    manifest = check(copy)
    assert manifest.runtime == "deeplens" and manifest.models == ["yolov3-tiny-onnx:1"]
    source = (copy / manifest.handler).read_text()
    for call in (
        "awscam.getLastFrame()",
        "doInference",
        "parseResult",
        "/tmp/results.mjpeg",
        "client.publish(topic=iot_topic",
    ):
        assert call in source


# ------------------------------------------- the sample function as a project, on a video


def dog_video(path: Path) -> Path:
    """A short MJPEG AVI of darknet's dog.jpg, shifted a little each frame (a real photo as
    video: the model must find the dog in each)."""
    image = cv2.resize(dog(), (640, 480))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for i in range(10):
        writer.write(np.roll(image, 4 * i, axis=1))
    writer.release()
    return path


@pytest.mark.slow
async def test_function_runs_as_project(
    fresh_nats: NatsServer, start_service: Any, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """projects/deeplens-object-detection, unmodified, deployed as a project: the projects
    service runs it in a host process on the frames capture takes from a video; its IoT JSON
    arrives on NATS and the frames it drew on the project's frame subject."""
    from nats.js.api import ObjectStoreConfig
    from nats.js.errors import BucketNotFoundError, NotFoundError
    from test_projects_service import deploy, start_projects, wait_report
    from test_publisher import Viewer, start_publisher

    from lensbus.modelpkg import pack
    from lensbus.schemas.deploy import object_name
    from lensbus.subjects import MODELS_BUCKET

    name = "deeplens-object-detection"
    video = dog_video(tmp_path / "dog.avi")  # first: it skips where the photos are missing
    nc = await nats_py.connect(fresh_nats.url)
    js = nc.jetstream()
    try:
        store = await js.object_store(MODELS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        store = await js.create_object_store(MODELS_BUCKET, ObjectStoreConfig())
    archive = pack(demo_models["yolov3-tiny-onnx"], tmp_path / "yolo.tar.gz")
    await store.put(object_name("yolov3-tiny-onnx", "1"), archive.read_bytes())

    infer = await nc.subscribe(SUBJECTS.project_output(name, "dogcam", "infer"))
    drawn = await nc.subscribe(SUBJECTS.project_frame(name, "dogcam"))
    await nc.flush()
    folder = Path(__file__).resolve().parents[1] / "projects" / name
    pub = start_publisher(start_service, fresh_nats.url)
    start_projects(start_service, fresh_nats.url, tmp_path)
    await deploy(nc, folder, name, "1")
    cap = start_service(
        "capture",
        fresh_nats.url,
        camera="dogcam",
        source=video,
        fps=5,
        loop="true",
    )
    cap.wait_healthy()
    await wait_report(nc, name, lambda r: r.state == "running" and r.serving == "1", 60)

    dogs = []
    deadline = time.monotonic() + 60
    while len(dogs) < 3 and time.monotonic() < deadline:
        msg = decode((await infer.next_msg(timeout=60)).data, ProjectMessage)
        assert msg.project == name and msg.topic == f"$aws/things/{name}/infer"
        assert not str(msg.payload).startswith("Error"), msg.payload
        if isinstance(msg.payload, dict) and msg.payload:
            dogs.append(msg)
    assert len(dogs) == 3, "no detections published"
    assert all(0.5 < m.payload["dog"] <= 1.0 for m in dogs), [m.payload for m in dogs]
    assert all(m.seq > 0 and m.camera == "dogcam" for m in dogs)

    frame = decode((await drawn.next_msg(timeout=30)).data, FrameEnvelope)
    assert (frame.camera, frame.width, frame.height) == ("dogcam", 858, 480)  # LocalDisplay 480p
    assert sample_boxes(frame.data) > 500, "no box drawn"
    await nc.close()

    # the publisher's project stream shows the frames the function drew
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{pub.port}/cameras/dogcam/project.mjpeg"
        parts = await asyncio.wait_for(Viewer().read(http, url, count=5), 30)
    shown = [cv2.imdecode(np.frombuffer(p.body, np.uint8), cv2.IMREAD_COLOR) for p in parts]
    assert any(
        im.shape == (480, 858, 3) and sample_boxes(p.body) > 500
        for im, p in zip(shown, parts, strict=True)
    ), [im.shape for im in shown]


def sample_boxes(jpeg: bytes) -> int:
    """Pixels of the sample's box colour, BGR (255, 165, 20) (its boxes are 10 px wide)."""
    pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return int(np.all(np.abs(pixels.astype(int) - (255, 165, 20)) < 40, axis=2).sum())
