"""Logging set-up and a rate limiter so bad input is logged once, not once per frame."""

from __future__ import annotations

import logging
import sys
import time


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # nats-py logs every reconnect attempt at ERROR; our callbacks log what matters.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


class RateLimit:
    """Allows one log line per key per ``interval_s``; counts what it suppressed."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        return True

    def take_suppressed(self, key: str) -> int:
        return self.suppressed.pop(key, 0)


def log_limited(
    logger: logging.Logger, limit: RateLimit, key: str, level: int, msg: str, *args: object
) -> None:
    """Log ``msg`` if ``key`` has not been logged within the limit's interval."""
    if limit.allow(key):
        skipped = limit.take_suppressed(key)
        suffix = f" ({skipped} more like this since the last report)" if skipped else ""
        logger.log(level, msg + suffix, *args)
