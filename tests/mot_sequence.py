"""A tracking sequence with ground truth, built from real imagery (import from a test module).

Real objects, cut (GrabCut) from darknet's photos where YOLOv3-tiny finds them (two people and
a dog), move along known paths over a real background (the beach of
darknet's kite.jpg, away from its people and kite). Along the way one passes in front of
another (the pasting order is the depth order): the second person walks behind the first
(fully hidden for a few frames: they cross), the dog trots the other way above them, its
paws behind their heads. The ground truth is each pasted object's bounding box (its cut's mask as
pasted), hidden parts included, as in the MOT benchmarks.

``build()`` is deterministic: the paths are fixed, the only randomness (a walker's bob, the
frames dropped by ``dropped``) comes from seeded generators.

``Sequence.gt_crossings(line)`` counts, from the truth, how often each object's anchor
point (bottom centre of its box by default) crosses a line (``lensbus.schemas.pipeline.Line``,
normalised) per direction, so line counting can be checked on the same frames.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from lensbus.modelpkg import Package
from lensbus.schemas.pipeline import Line
from lensbus_analytics.tracker import Observation

PHOTOS = Path("/usr/share/darknet/data")
WIDTH, HEIGHT = 640, 480
FPS = 10.0
FRAMES = 120
# The vertical line through the middle of the frame: every object crosses it once.
MIDDLE = Line(name="middle", a=(0.5, 0.02), b=(0.5, 0.98))


@dataclass(frozen=True)
class Actor:
    """An object: a crop of a photo (its detector box there), its height on screen, its
    path (centre from ``p0`` at frame ``start`` to ``p1`` at frame ``end``)."""

    name: str
    label: str
    photo: str
    crop: tuple[int, int, int, int]  # x1, y1, x2, y2 in the photo
    height: int
    start: int
    end: int
    p0: tuple[float, float]
    p1: tuple[float, float]
    flip: bool = False
    bob: float = 0.0  # vertical bob amplitude, px (a walker's step)


# Listed back to front: a later actor is pasted over an earlier one. The sizes are where
# YOLOv3-tiny finds each well (a person shorter than about half the frame gets a box on its
# jacket only; darknet's horse and car, pasted, are missed or boxed twice).
ACTORS = (
    Actor("dog", "dog", "dog.jpg", (124, 219, 382, 518), 200, 5, 119, (540, 115), (110, 120)),
    Actor(
        "walker2",
        "person",
        "person.jpg",
        (180, 94, 278, 383),
        250,
        12,
        119,
        (590, 330),
        (100, 335),
        flip=True,
        bob=3.0,
    ),
    Actor(
        "walker1",
        "person",
        "person.jpg",
        (180, 94, 278, 383),
        260,
        0,
        108,
        (50, 335),
        (590, 340),
        bob=4.0,
    ),
)


@dataclass
class Sequence:
    frames: list[npt.NDArray[np.uint8]]  # BGR, HEIGHT x WIDTH
    # per frame: {object id: box (x1, y1, x2, y2) in pixels}
    truth: list[dict[int, tuple[float, float, float, float]]]
    labels: dict[int, str] = field(default_factory=dict)
    fps: float = FPS

    def time(self, frame: int) -> float:
        return frame / self.fps

    def gt_crossings(self, line: Line = MIDDLE, anchor: str = "bottom_center") -> dict[str, int]:
        """Crossings of ``line`` by the truth's anchor points, per direction: ``in`` from the
        left of a->b to its right as drawn on the image (y down), ``out`` the other way."""
        counts = {"in": 0, "out": 0}
        for oid in self.labels:
            last: tuple[float, float] | None = None
            for box in (t[oid] for t in self.truth if oid in t):
                point = _anchor(box, anchor)
                if _cross(line.a, line.b, point) == 0:
                    continue  # on the line: the crossing is counted when it leaves it
                direction = _crossing(line, last, point) if last else None
                if direction:
                    counts[direction] += 1
                last = point
        return counts


def _anchor(box: tuple[float, float, float, float], anchor: str) -> tuple[float, float]:
    x1, y1, x2, y2 = box
    y = y2 if anchor == "bottom_center" else (y1 + y2) / 2
    return ((x1 + x2) / 2 / WIDTH, y / HEIGHT)


def _cross(o: tuple[float, float], d: tuple[float, float], p: tuple[float, float]) -> float:
    # z of (d - o) x (p - o); with y down, > 0 is the right of o->d as seen on the image
    return (d[0] - o[0]) * (p[1] - o[1]) - (d[1] - o[1]) * (p[0] - o[0])


def _crossing(line: Line, p: tuple[float, float], q: tuple[float, float]) -> str | None:
    a, b = line.a, line.b
    sp, sq = _cross(a, b, p), _cross(a, b, q)
    if sp == 0 or sq == 0 or (sp > 0) == (sq > 0):
        return None
    if (_cross(p, q, a) > 0) == (_cross(p, q, b) > 0):
        return None  # the path crosses the line's extension, not the segment
    return "in" if sq > 0 else "out"


def background() -> npt.NDArray[np.uint8]:
    """The beach of kite.jpg, right of its people and below its kite."""
    photo = _read("kite.jpg")
    image = cv2.resize(photo[300:900, 560:1352], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    return np.asarray(image, dtype=np.uint8)


def _read(name: str) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(PHOTOS / name))
    if image is None:
        raise FileNotFoundError(PHOTOS / name)
    return np.asarray(image, dtype=np.uint8)


def _sprite(actor: Actor) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The actor's pixels at its height and their mask: GrabCut (seeded) separates the object
    from the rest of its detector box, so an object is pasted, not a rectangle of its photo."""
    x1, y1, x2, y2 = actor.crop
    photo = _read(actor.photo)
    pad = 8
    ox1, oy1 = max(x1 - pad, 0), max(y1 - pad, 0)
    ox2, oy2 = min(x2 + pad, photo.shape[1]), min(y2 + pad, photo.shape[0])
    scale = actor.height / (y2 - y1)
    crop = cv2.resize(
        photo[oy1:oy2, ox1:ox2],
        (round((ox2 - ox1) * scale), round((oy2 - oy1) * scale)),
        interpolation=cv2.INTER_AREA,
    )
    rect = (
        round((x1 - ox1) * scale),
        round((y1 - oy1) * scale),
        round((x2 - x1) * scale),
        round((y2 - y1) * scale),
    )
    mask = np.zeros(crop.shape[:2], np.uint8)
    cv2.setRNGSeed(15)
    models = (np.zeros((1, 65)), np.zeros((1, 65)))
    cv2.grabCut(crop, mask, rect, models[0], models[1], 5, cv2.GC_INIT_WITH_RECT)
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    bx, by, bw, bh = cv2.boundingRect(fg.astype(np.uint8))
    sprite, alpha = crop[by : by + bh, bx : bx + bw], fg[by : by + bh, bx : bx + bw]
    if actor.flip:
        sprite, alpha = sprite[:, ::-1], alpha[:, ::-1]
    return np.ascontiguousarray(sprite), np.ascontiguousarray(alpha)


def build(frames: int = FRAMES, seed: int = 15) -> Sequence:
    """The sequence: ``frames`` frames at ``FPS``, the truth, each object's label."""
    rng = np.random.default_rng(seed)
    base = background()
    sprites = _sprites()
    phases = rng.uniform(0, 2 * np.pi, len(ACTORS))
    seq = Sequence(frames=[], truth=[], labels={k + 1: a.label for k, a in enumerate(ACTORS)})
    for f in range(frames):
        image = base.copy()
        truth: dict[int, tuple[float, float, float, float]] = {}
        for k, (actor, (sprite, alpha)) in enumerate(zip(ACTORS, sprites, strict=True)):
            if not actor.start <= f <= actor.end:
                continue
            u = (f - actor.start) / max(actor.end - actor.start, 1)
            cx = actor.p0[0] + u * (actor.p1[0] - actor.p0[0])
            cy = actor.p0[1] + u * (actor.p1[1] - actor.p0[1])
            cy += actor.bob * np.sin(2 * np.pi * f / 6 + phases[k])
            h, w = sprite.shape[:2]
            x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
            if x0 < 0 or y0 < 0 or x0 + w > WIDTH or y0 + h > HEIGHT:
                raise ValueError(f"{actor.name} leaves the frame at frame {f}: fix its path")
            region = image[y0 : y0 + h, x0 : x0 + w]
            region[alpha] = sprite[alpha]
            truth[k + 1] = (float(x0), float(y0), float(x0 + w), float(y0 + h))
        seq.frames.append(image)
        seq.truth.append(truth)
    return seq


_SPRITES: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]] = []


def _sprites() -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]]:
    # GrabCut takes a second or two on a busy machine: once per process
    if not _SPRITES:
        _SPRITES.extend(_sprite(a) for a in ACTORS)
    return _SPRITES


def dropped(frames: int, fraction: float, seed: int = 30) -> list[int]:
    """The frames kept when ``fraction`` of them are dropped at random (seeded), in order."""
    rng = np.random.default_rng(seed)
    keep = rng.random(frames) >= fraction
    keep[0] = True
    return [i for i in range(frames) if keep[i]]


_DETECTIONS: dict[tuple[Path, float, int], list[list[Observation]]] = {}


def detections(seq: Sequence, package: Package, score_threshold: float) -> list[list[Observation]]:
    """The real detector's outputs on every frame of ``seq``: ``package`` (e.g. the demo
    YOLOv3-tiny from tests/models_fixture.py) run with its score threshold set to
    ``score_threshold``. Kept for the test session: ~8 s for 120 frames on a busy core."""
    from lensbus_inference.model import load_model

    key = (package.root, score_threshold, len(seq.frames))
    if key not in _DETECTIONS:
        manifest = package.manifest.model_copy(update={"score_threshold": score_threshold})
        model = load_model(dataclasses.replace(package, manifest=manifest), threads=1)
        model.warmup()
        out = []
        for frame in seq.frames:
            found = model.run(frame, WIDTH, HEIGHT).detections
            box = [(d.box.left, d.box.top, d.box.right, d.box.bottom) for d in found]
            out.append(
                [
                    Observation(b, d.score, d.label, d.class_id)
                    for b, d in zip(box, found, strict=True)
                ]
            )
        model.close()
        _DETECTIONS[key] = out
    return _DETECTIONS[key]
