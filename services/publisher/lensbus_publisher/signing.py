"""What a webhook request carries besides the event, and when a failed one is tried again
(pure, no I/O).

Headers of every delivery:

- ``Lensbus-Delivery``: the delivery's id, the same on every try (at least once means a
  receiver may get one twice: it keeps the ids it took and drops a repeat);
- ``Lensbus-Attempt``: 1 for the first try, 2 for the first retry, ...;
- ``Lensbus-Timestamp``: Unix seconds when this try was signed;
- ``Lensbus-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the rule's
  ``webhook_secret``, of ``<Lensbus-Timestamp>.`` followed by the raw body; absent when the
  rule has no secret. The timestamp is inside the MAC so a receiver can refuse old replays.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

DELIVERY_HEADER = "Lensbus-Delivery"
ATTEMPT_HEADER = "Lensbus-Attempt"
TIMESTAMP_HEADER = "Lensbus-Timestamp"
SIGNATURE_HEADER = "Lensbus-Signature"

# Statuses worth another try besides 5xx: the request was fine, the receiver was not ready.
RETRY_STATUS = frozenset({408, 429})
# Statuses whose Retry-After is honoured (RFC 9110 gives it to 503 and 429 to slow clients).
RETRY_AFTER_STATUS = frozenset({429, 503})
# A receiver asking for more than this is waited for this long: a typo of a date must not
# park a delivery for a year (its age limit drops it in the end anyway).
RETRY_AFTER_MAX_S = 3600.0


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def delivery_headers(
    delivery: str, attempt: int, body: bytes, secret: str | None, now: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    headers = {
        "Content-Type": "application/json",
        DELIVERY_HEADER: delivery,
        ATTEMPT_HEADER: str(attempt),
        TIMESTAMP_HEADER: str(timestamp),
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = signature(secret, timestamp, body)
    return headers


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delay-seconds or an HTTP date), at most
    :data:`RETRY_AFTER_MAX_S`; None when absent or unreadable (then back-off applies)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT; a zone-less one is read as such
            return None
        # An HTTP date has whole seconds: wait for the next whole second, never before it.
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def backoff(
    failures: int, first_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay after the ``failures``-th failed try: doubling from ``first_s`` up to ``max_s``,
    then a random point in its upper half, so receivers coming back are not hit by every
    publisher at the same instant ("equal jitter")."""
    base = min(max_s, first_s * 2.0 ** min(max(failures - 1, 0), 62))
    return base / 2 + rand() * base / 2
