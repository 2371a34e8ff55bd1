"""Event rules: which results fire which rule (pure logic, no I/O).

A result *matches* a rule when one of its labels is in the rule's set with score >=
``min_score`` (a detection or a class) or covering >= ``min_area`` of the frame (a segment).
A rule fires for a camera when the last ``consecutive`` results of that camera matched and
the last firing was at least ``cooldown_s`` earlier, in frame time (``capture_ns``): with the
label always present, a rule fires once per cooldown.
"""

from __future__ import annotations

from dataclasses import dataclass

from lensbus.schemas import Box, Event, Result
from lensbus_publisher.config import Rule


@dataclass(frozen=True)
class Match:
    label: str
    score: float
    box: Box | None


@dataclass(frozen=True)
class Firing:
    rule: Rule
    match: Match
    consecutive: int


def best_match(rule: Rule, result: Result) -> Match | None:
    """The highest-scoring label of ``result`` that satisfies ``rule``, if any."""
    best: Match | None = None
    for det in result.detections:
        if det.label in rule.labels and det.score >= rule.min_score:
            if best is None or det.score > best.score:
                best = Match(det.label, det.score, det.box)
    for cls in result.classes:
        if cls.label in rule.labels and cls.score >= rule.min_score:
            if best is None or cls.score > best.score:
                best = Match(cls.label, cls.score, None)
    for seg in result.segments:
        if seg.label in rule.labels and seg.area >= rule.min_area:
            if best is None or seg.area > best.score:
                best = Match(seg.label, seg.area, seg.box)
    return best


@dataclass
class _State:
    streak: int = 0
    last_fired_ns: int | None = None


class RuleEngine:
    """Feeds results through every rule; keeps a streak and a cooldown per rule and camera."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = list(rules)
        self._state: dict[tuple[str, str], _State] = {}
        self._zone_fired: dict[tuple[str, str], int] = {}  # (rule, camera): capture_ns

    def forget(self, camera: str) -> None:
        """Drop a camera's streaks and cooldowns (its capture restarted)."""
        for key in [k for k in self._state if k[1] == camera]:
            del self._state[key]
        for key in [k for k in self._zone_fired if k[1] == camera]:
            del self._zone_fired[key]

    def select(self, event: Event) -> list[Rule]:
        """The rules a zone event goes to (clip, webhook): those selecting it whose last
        zone firing on the camera was at least ``cooldown_s`` earlier, in frame time."""
        chosen = []
        for rule in self.rules:
            if not rule.selects(event):
                continue
            last = self._zone_fired.get((rule.name, event.camera))
            if last is not None and 0 <= event.capture_ns - last < rule.cooldown_s * 1e9:
                continue
            self._zone_fired[(rule.name, event.camera)] = event.capture_ns
            chosen.append(rule)
        return chosen

    def feed(self, result: Result) -> list[Firing]:
        fired = []
        for rule in self.rules:
            if not rule.on_results or (rule.cameras and result.camera not in rule.cameras):
                continue
            state = self._state.setdefault((rule.name, result.camera), _State())
            match = best_match(rule, result)
            if match is None:
                state.streak = 0
                continue
            state.streak += 1
            if state.streak < rule.consecutive:
                continue
            last = state.last_fired_ns
            if last is not None and result.capture_ns - last < rule.cooldown_s * 1e9:
                continue
            state.last_fired_ns = result.capture_ns
            fired.append(Firing(rule=rule, match=match, consecutive=state.streak))
        return fired
