"""Cascade benchmark (run by hand, not a test): what a classify stage costs per crop, and the
latency a pipeline adds to a frame over the single model.

YOLOv3-tiny (ONNX Runtime) is the primary; the text-orientation classifier (ONNX Runtime,
224x224) runs on crops of its detections, through inference's own per-frame path
(``frames.run_model`` with and without a ``Plan``) on the real photos (dog.jpg, person.jpg,
horses.jpg, decoded at full size).  Every label is classified, ``max_crops`` at 1, 4 and 8;
the configurations run interleaved (one frame each in turn), so drifting load hits all
alike.  Milliseconds are medians.

    python bench/cascade.py              # 40 rounds
    python bench/cascade.py --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lensbus.images import decode_jpeg
from lensbus.modelpkg import verify
from lensbus.schemas import FrameEnvelope
from lensbus.schemas.pipeline import ClassifyStage
from lensbus_inference.cascade import Cascade
from lensbus_inference.frames import DecodedFrame, Plan, run_model
from lensbus_inference.model import LoadedModel, load_model
from lensbus_inference.packaging.demo_packages import build_classifier, build_demo

PHOTOS = Path("/usr/share/darknet/data")
NAMES = ("dog.jpg", "person.jpg", "horses.jpg")
ALL_LABELS = ["person", "dog", "horse", "bicycle", "truck", "car", "sheep", "cow"]


def frames() -> list[DecodedFrame]:
    out = []
    for seq, name in enumerate(NAMES):
        data = (PHOTOS / name).read_bytes()
        image = decode_jpeg(data)
        h, w = image.shape[:2]
        env = FrameEnvelope(camera="bench", seq=seq, capture_ns=0, width=w, height=h, data=data)
        now = time.perf_counter()
        out.append(DecodedFrame(env, image, 1, now, now, now))
    return out


def models(folder: Path) -> tuple[LoadedModel, LoadedModel]:
    build_demo(folder)
    yolo = load_model(verify(folder / "yolov3-tiny-onnx"), threads=2)
    clf = load_model(verify(build_classifier(folder)), threads=2)
    yolo.warmup()
    clf.warmup()
    return yolo, clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        yolo, clf = models(Path(tmp))
        plans: dict[str, Plan | None] = {"single model": None}
        for n in (1, 4, 8):
            stage = ClassifyStage(name="orient", model="c:1", labels=ALL_LABELS, max_crops=n)
            plans[f"+ classify, max_crops {n}"] = Plan("model", (Cascade(stage, clf),))
        frame_ms: dict[str, list[float]] = {k: [] for k in plans}
        crop_ms: dict[str, list[float]] = {k: [] for k in plans}
        primary_ms: dict[str, list[float]] = {k: [] for k in plans}
        crops: dict[str, int] = dict.fromkeys(plans, 0)
        for _ in range(args.rounds):
            for f in frames():
                for key, plan in plans.items():
                    t0 = time.perf_counter()
                    r = run_model(f, yolo, "bench", plan)
                    frame_ms[key].append((time.perf_counter() - t0) * 1000)
                    t = r.timings
                    primary_ms[key].append((t.preprocess + t.compute + t.postprocess) * 1000)
                    for st in r.stages[1:]:
                        crops[key] += st.items
                        if st.items:
                            crop_ms[key].append(st.ms / st.items)
        base = statistics.median(frame_ms["single model"])
        print("| pipeline | ms/frame | added ms | primary ms | crops/frame | ms/crop |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        n_frames = args.rounds * len(NAMES)
        for key in plans:
            med = statistics.median(frame_ms[key])
            per_crop = statistics.median(crop_ms[key]) if crop_ms[key] else 0.0
            print(
                f"| {key} | {med:.1f} | {med - base:+.1f} | "
                f"{statistics.median(primary_ms[key]):.1f} | {crops[key] / n_frames:.1f} "
                f"| {per_crop:.2f} |"
            )
        yolo.close()
        clf.close()


if __name__ == "__main__":
    main()
