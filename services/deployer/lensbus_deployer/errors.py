"""The deployer's own errors, under lensbus's one base (:class:`lensbus.errors.LensbusError`)."""

from __future__ import annotations

from lensbus.errors import LensbusError


class Refused(LensbusError):
    """A request the deployer turns down; ``code`` and the message go into the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StaleRecord(LensbusError):
    """The record changed since it was read (compare-and-set lost): read again."""
