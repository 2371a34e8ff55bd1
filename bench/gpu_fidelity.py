"""Fidelity check (run by hand and by bench/gpu.sh, not a test): YOLOv3-tiny through PyTorch on
CPU and GPU (fp32 and fp16) against the ONNX package, on real photos.

Each variant's detections are matched to ONNX Runtime's on the CPU (same label, greedy by IoU)
and held to the fidelity tests' bar: IoU >= 0.98 and score within 0.02 (fp16: IoU >= 0.95,
score within 0.05, since half precision moves scores by about 1e-3 per layer).  Prints a table,
writes JSON with ``--json``, exits 1 when a variant misses its bar.

    python bench/gpu_fidelity.py                       # CPU: torch vs ONNX
    python bench/gpu_fidelity.py --device gpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
from backends import half_package
from early_threads import ROOT

from lensbus.backends import parse_device
from lensbus.modelpkg import verify
from lensbus_inference.model import load_model
from lensbus_inference.packaging.demo_packages import build_yolo

PHOTOS = ("dog.jpg", "person.jpg", "horses.jpg")
BARS = {"fp32": (0.98, 0.02), "fp16": (0.95, 0.05)}  # (min IoU, max score difference)

Det = tuple[str, float, tuple[float, float, float, float]]


def detections(folder: Path, device: str, photos: Path) -> list[list[Det]]:
    model = load_model(verify(folder), device)
    model.warmup()
    out = []
    for name in PHOTOS:
        image = cv2.imread(str(photos / name))
        h, w = image.shape[:2]
        dets = model.run(image, w, h).detections
        out.append(
            [(d.label, d.score, (d.box.left, d.box.top, d.box.right, d.box.bottom)) for d in dets]
        )
    model.close()
    return out


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare(ref: list[list[Det]], got: list[list[Det]]) -> dict[str, Any]:
    """Greedy matching per photo: each reference detection takes the best same-label one left."""
    worst_iou, worst_score, unmatched = 1.0, 0.0, 0
    for want, have in zip(ref, got, strict=True):
        left = list(have)
        for label, score, box in want:
            same = [d for d in left if d[0] == label]
            if not same:
                unmatched += 1
                continue
            best = max(same, key=lambda d: iou(box, d[2]))
            left.remove(best)
            worst_iou = min(worst_iou, iou(box, best[2]))
            worst_score = max(worst_score, abs(score - best[1]))
        unmatched += len(left)
    return {
        "min_iou": round(worst_iou, 4),
        "max_score_diff": round(worst_score, 4),
        "unmatched": unmatched,
        "detections": sum(len(d) for d in got),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (torch CPU only), gpu or gpu:N")
    parser.add_argument("--models", default=str(ROOT / ".lensbus" / "models"))
    parser.add_argument("--photos", default="/usr/share/darknet/data")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args()
    photos = Path(args.photos)
    skipped: list[str] = []
    folders = build_yolo(args.models, skipped)
    if "torch" not in folders:
        print(f"no torch package built: {'; '.join(skipped)}", file=sys.stderr)
        return 1
    ref = detections(folders["onnx"], "cpu", photos)
    variants = [("torch cpu", folders["torch"], "cpu", "fp32")]
    if parse_device(args.device)[0] == "gpu":
        variants.append((f"torch {args.device} fp32", folders["torch"], args.device, "fp32"))
        half = half_package(folders["torch"])
        variants.append((f"torch {args.device} fp16", half, args.device, "fp16"))
    rows: dict[str, Any] = {"reference": "onnx cpu", "photos": list(PHOTOS), "variants": {}}
    failed = False
    print("| variant | detections | min IoU | max score diff | unmatched | bar | ok |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for name, folder, device, precision in variants:
        row = compare(ref, detections(folder, device, photos))
        min_iou, max_diff = BARS[precision]
        row["ok"] = ok = (
            row["unmatched"] == 0
            and row["min_iou"] >= min_iou
            and row["max_score_diff"] <= max_diff
        )
        failed |= not ok
        rows["variants"][name] = row
        print(
            f"| {name} | {row['detections']} | {row['min_iou']:.4f} | "
            f"{row['max_score_diff']:.4f} | {row['unmatched']} | IoU>={min_iou}, "
            f"score+-{max_diff} | {'yes' if ok else 'NO'} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
