"""What running projects send for one camera's project stream (pure logic, no I/O).

* overlays (``ctx.overlay``: :class:`lensbus.schemas.project.Overlay`): per project the few
  newest, each alive for its ``ttl_s`` from its arrival. A frame is drawn with the overlay
  made for its own seq when that one is alive, else with the newest alive one (a project
  that is a frame behind still shows its shapes);
* frames a project drew itself (a DeepLens function's local display): the newest of each
  project; while one is fresh the project stream shows it instead of drawing the results.

A stream shows every project (key ``""``) or one project (``?project=NAME``). Project names
come from subjects only project users may publish on; still, a camera holds at most
:data:`MAX_PROJECTS` of them so made-up names cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from lensbus.errors import Rejected
from lensbus.schemas.project import Overlay, Shape

MAX_PROJECTS = 16  # projects sending overlays or frames for one camera, at most
OVERLAYS_KEPT = 8  # recent overlays per project: enough to find a frame's own seq
DRAWN_FRESH_S = 2.0  # a project-drawn frame younger than this replaces the drawn results


@dataclass(frozen=True, slots=True)
class ProjectFrame:
    """One frame of a project stream, ready to serve."""

    seq: int
    capture_ns: int
    result_seq: int  # -1: drawn without a result
    jpeg: bytes
    rendered: float  # time.monotonic() when ready (a project-drawn frame: when it came)
    drawn_by: str = ""  # the project that drew it; "": drawn by this publisher

    def fresh(self, now: float) -> bool:
        """A project-drawn frame is shown for DRAWN_FRESH_S after it came."""
        return not self.drawn_by or now - self.rendered < DRAWN_FRESH_S


@dataclass(frozen=True, slots=True)
class OverlayItem:
    overlay: Overlay
    arrived: float  # time.monotonic()

    def alive(self, now: float) -> bool:
        return now - self.arrived < self.overlay.ttl_s


@dataclass
class ProjectInputs:
    """One camera's overlays and project-drawn frames, by project."""

    overlays: dict[str, OrderedDict[int, OverlayItem]] = field(default_factory=dict)
    drawn: dict[str, ProjectFrame] = field(default_factory=dict)

    def _room(self, project: str, now: float) -> None:
        """Make sure ``project`` may hold a place: projects with nothing alive are dropped
        first; a camera full of live projects refuses a new one."""
        if project in self.overlays or project in self.drawn:
            return
        if len(set(self.overlays) | set(self.drawn)) < MAX_PROJECTS:
            return
        for name, ring in list(self.overlays.items()):
            if not any(item.alive(now) for item in ring.values()):
                del self.overlays[name]
        for name, frame in list(self.drawn.items()):
            if now - frame.rendered >= DRAWN_FRESH_S:
                del self.drawn[name]
        if len(set(self.overlays) | set(self.drawn)) >= MAX_PROJECTS:
            raise Rejected("too_many_projects", f"over {MAX_PROJECTS} projects on one camera")

    def add_overlay(self, overlay: Overlay, now: float) -> None:
        self._room(overlay.project, now)
        ring = self.overlays.setdefault(overlay.project, OrderedDict())
        ring.pop(overlay.seq, None)  # a second overlay for a seq replaces the first
        ring[overlay.seq] = OverlayItem(overlay, now)
        while len(ring) > OVERLAYS_KEPT:
            ring.popitem(last=False)

    def add_drawn(self, frame: ProjectFrame, now: float) -> None:
        self._room(frame.drawn_by, now)
        self.drawn[frame.drawn_by] = frame

    def drawn_for(self, key: str, now: float) -> ProjectFrame | None:
        """The newest fresh project-drawn frame a stream of ``key`` shows, if any. The stream
        of every project shows one only while no other project has shapes to draw: a drawn
        frame would hide another project's blur (faces shown); ``?project=`` shows it."""
        frames = [f for p, f in self.drawn.items() if (not key or p == key) and f.fresh(now)]
        best = max(frames, key=lambda f: f.rendered, default=None)
        if best is not None and not key and self.shapes_alive(now, besides=best.drawn_by):
            return None
        return best

    def shapes_alive(self, now: float, besides: str) -> bool:
        """Whether a project other than ``besides`` has an overlay with shapes alive."""
        return any(
            item.alive(now) and item.overlay.shapes
            for project, ring in self.overlays.items()
            if project != besides
            for item in ring.values()
        )

    def shapes_for(
        self, key: str, seq: int, capture_ns: int, now: float
    ) -> list[tuple[str, list[Shape]]]:
        """(project, shapes) to draw on the frame ``seq``: each project's overlay for that
        frame if alive, else its newest alive one."""
        out = []
        for project, ring in self.overlays.items():
            if key and project != key:
                continue
            own = ring.get(seq)
            if own is not None and own.overlay.capture_ns not in (0, capture_ns):
                own = None  # the capture restarted: that seq is another frame now
            if own is None or not own.alive(now):
                own = next((i for i in reversed(ring.values()) if i.alive(now)), None)
            if own is not None and own.overlay.shapes:
                out.append((project, own.overlay.shapes))
        return out
