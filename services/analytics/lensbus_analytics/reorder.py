"""Putting one camera's results back in seq order (pure logic).

Inference replicas share a queue group, so a camera's frames are split between them and
their results arrive out of order. A tracker needs them in order: a result that comes
before an earlier seq is held until that seq arrives, or until the gap is given up (more
than ``frames`` held, or the oldest held for ``wait_s``: the frame was dropped upstream).
A result whose seq was already passed is *late*; the caller publishes it untracked, so no
frame's result is lost, and counts it. A seq far behind the expected one is a restarted
capture (its seqs start again), not a late result: the order starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# A seq this many windows behind the expected one is a restart, not a late result.
RESTART_WINDOWS = 4


@dataclass
class Step(Generic[T]):
    """What one push or flush gave: results now in order, and what happened."""

    ready: list[T] = field(default_factory=list)
    late: bool = False  # the pushed result's seq was already passed
    held: bool = False  # the pushed result waits for an earlier seq
    gaps: int = 0  # missing seqs given up


class Reorder(Generic[T]):
    def __init__(self, frames: int, wait_s: float) -> None:
        self.frames = frames
        self.wait_s = wait_s
        self.next_seq: int | None = None  # unknown until the first result is released
        self._pending: dict[int, tuple[float, T]] = {}  # seq -> (arrival time, item)

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, seq: int, item: T, now: float) -> Step[T]:
        step: Step[T] = Step()
        expected = self.next_seq
        if expected is not None and seq < expected:
            if expected - seq <= RESTART_WINDOWS * self.frames:
                step.late = True
                return step
            self._release_all(step)  # a restarted capture: what is held goes first
            self.next_seq = None
        if seq in self._pending:
            step.late = True  # a duplicate seq: published as it is, like a late one
            return step
        self._pending[seq] = (now, item)
        self._release(step, now)
        # The very first result waits for a possibly earlier one: not a reordering.
        step.held = expected is not None and seq in self._pending
        return step

    def flush(self, now: float) -> Step[T]:
        """Give up gaps that waited ``wait_s``: what the clock releases between pushes."""
        step: Step[T] = Step()
        self._release(step, now)
        return step

    def _release(self, step: Step[T], now: float) -> None:
        while self._pending:
            lowest = min(self._pending)
            if self.next_seq is not None and lowest == self.next_seq:
                self._take(lowest, step)
                continue
            oldest = min(arrived for arrived, _ in self._pending.values())
            if len(self._pending) <= self.frames and now - oldest < self.wait_s:
                return
            if self.next_seq is not None:
                step.gaps += lowest - self.next_seq
            self._take(lowest, step)

    def _release_all(self, step: Step[T]) -> None:
        for seq in sorted(self._pending):
            self._take(seq, step)

    def _take(self, seq: int, step: Step[T]) -> None:
        _, item = self._pending.pop(seq)
        step.ready.append(item)
        self.next_seq = seq + 1
