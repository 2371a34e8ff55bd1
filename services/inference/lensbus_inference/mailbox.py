"""Where frames wait for the model: the newest few per camera, served in turn."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

HOLD_SPARE = 4  # frames per camera kept on top of queue_depth during a swap's step


@dataclass(eq=False)
class Pending:
    """A frame message waiting in the mailbox, with when it arrived."""

    data: bytes
    arrived: float  # time.perf_counter()
    camera: str = ""  # the camera its subject names (its envelope must name the same)


class Mailbox:
    """The newest ``depth`` frames per camera: a frame that arrives while the model is busy
    and finds ``depth`` frames of its camera waiting replaces the oldest of them (returned,
    so it can be counted).  Depth 1 (the default) keeps only the newest frame; depth 2 also
    rides out one slow frame (a swap loading beside the model, a burst) without losing a
    frame, for one more frame of latency while frames come faster than the model runs."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        # Frames per camera kept on top of ``depth`` while a swap's step holds the model
        # (hold/release): a step may take longer than a frame's interval (MXNet's first run
        # under load: up to ~4 at 20 fps).  Kept until the worker has caught up, so none of
        # the frames that waited is dropped after the step either.
        self.spare = 0
        self._holds = 0
        self._waiting: OrderedDict[str, deque[Pending]] = OrderedDict()

    def hold(self) -> None:
        self._holds += 1
        self.spare = HOLD_SPARE

    def release(self) -> None:
        self._holds -= 1
        self._settle()

    def _settle(self) -> None:
        if not self._holds and not self._waiting:  # every frame that waited was served
            self.spare = 0

    def put(self, camera: str, item: Pending) -> Pending | None:
        frames = self._waiting.setdefault(camera, deque())
        frames.append(item)
        if len(frames) <= self.depth + self.spare:
            return None
        # Moved to the end: cameras are served in the order their oldest frames came in.
        self._waiting.move_to_end(camera)
        return frames.popleft()

    def take(self) -> tuple[str, Pending] | None:
        """The camera that has waited longest and its oldest waiting frame."""
        if not self._waiting:
            return None
        camera, frames = next(iter(self._waiting.items()))
        item = frames.popleft()
        if frames:
            self._waiting.move_to_end(camera)  # the other cameras' turn first
        else:
            del self._waiting[camera]
        self._settle()
        return camera, item

    def __len__(self) -> int:
        return sum(len(frames) for frames in self._waiting.values())
