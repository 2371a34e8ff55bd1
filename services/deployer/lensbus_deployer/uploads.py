"""Uploads in progress: chunks go to a temporary file in the work dir, never to the store.

A live upload's file is held under an exclusive ``flock`` until its commit ends: the kernel
drops the lock when its deployer dies (SIGKILL included), so a file nobody locks belongs to
an upload that is over, and is removed at start and by every sweep, whatever its age.

An upload id names the deployer that took it (``<instance>:<random>``): chunk and commit
requests reach every deployer (no queue group, the chunks must all reach the one holding
the file), and only the owner answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lensbus_deployer import metrics
from lensbus_deployer.errors import Refused

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PART_SUFFIX = ".part"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@dataclass
class Upload:
    id: str
    size: int
    sha256: str
    path: Path
    file: BinaryIO
    received: int = 0
    last_active: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()  # drops the lock too

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class Uploads:
    """The uploads this deployer holds, and the files behind them."""

    def __init__(
        self,
        work_dir: Path,
        instance: str,
        max_uploads: int,
        max_bytes: int,
        idle_timeout_s: float,
    ) -> None:
        self.dir = work_dir / "uploads"
        self.unpack_dir = work_dir / "unpack"
        self.instance = instance
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self._uploads: dict[str, Upload] = {}
        # Unpack dirs of commits in progress (never swept).
        self.busy: set[Path] = set()

    def __len__(self) -> int:
        return len(self._uploads)

    def prepare(self) -> None:
        """Create the work dirs and remove what dead deployers left there."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.unpack_dir.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def sweep(self) -> int:
        """Remove upload files no live deployer holds, and their unpack dirs; returns the
        bytes freed (logged, and counted in ``lensbus_deployer_leftover_bytes_removed_total``).
        """
        held = {p for p in self._part_files() if _locked(p)}
        mine = held | {u.path for u in self._uploads.values()} | self.busy
        freed = removed = 0
        for path in self._part_files():
            if path not in mine:
                freed += _remove(path)
                removed += 1
        if self.unpack_dir.is_dir():
            for path in self.unpack_dir.iterdir():
                # An unpack dir is named after its upload's file, held through the commit.
                if path not in mine and self.dir / f"{path.name}{PART_SUFFIX}" not in held:
                    freed += _remove(path)
                    removed += 1
        if removed:
            metrics.LEFTOVER_BYTES.labels("upload_file").inc(freed)
            log.info(
                "removed %d upload file(s) left by an upload that is over: %s freed",
                removed,
                human_bytes(freed),
            )
        return freed

    def _part_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.iterdir() if p.name.endswith(PART_SUFFIX)]

    def owns(self, upload_id: str) -> bool:
        return upload_id.rsplit(":", 1)[0] == self.instance

    def begin(self, size: int, sha256: str) -> Upload:
        if not _SHA256.fullmatch(sha256):
            raise Refused("bad_request", "sha256 must be 64 lowercase hex digits")
        if size > self.max_bytes:
            raise Refused(
                "invalid_package",
                f"package is {human_bytes(size)} ({size} bytes), over this deployer's limit of "
                f"{human_bytes(self.max_bytes)} (LENSBUS_DEPLOYER_MAX_PACKAGE_BYTES)",
            )
        if len(self._uploads) >= self.max_uploads:
            raise Refused(
                "conflict",
                f"{len(self._uploads)} uploads already in progress (the limit); try again later",
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        upload_id = f"{self.instance}:{secrets.token_hex(8)}"
        path = self.dir / f"{upload_id.replace(':', '-')}{PART_SUFFIX}"
        file = open(path, "wb")
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        upload = Upload(id=upload_id, size=size, sha256=sha256, path=path, file=file)
        self._uploads[upload_id] = upload
        return upload

    def get(self, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise Refused(
                "not_found",
                f"upload {upload_id!r} is unknown: it was committed, or expired after "
                f"{self.idle_timeout_s:g} s without a chunk, or the deployer restarted; "
                "upload the package again",
            )
        return upload

    async def write(self, upload: Upload, offset: int, data: bytes) -> None:
        """Write a chunk at ``offset``; a chunk sent again (a retry) overwrites itself."""
        if offset > upload.received:
            raise Refused(
                "bad_request",
                f"chunk at offset {offset}, but only {upload.received} bytes received so far: "
                "send the chunks in order",
            )
        end = offset + len(data)
        if end > upload.size:
            raise Refused(
                "bad_request",
                f"chunk ends at byte {end}, past the announced size of {upload.size} bytes",
            )

        def _write() -> None:
            if offset != upload.received:
                upload.file.seek(offset)
                upload.file.truncate()
            upload.file.write(data)

        await asyncio.to_thread(_write)
        upload.received = end
        upload.last_active = time.monotonic()

    def take(self, upload_id: str) -> Upload:
        """Remove an upload from the table for its commit (no more chunks accepted); its
        file stays open, so locked, until the commit discards it."""
        upload = self.get(upload_id)
        del self._uploads[upload_id]
        upload.file.flush()
        return upload

    def expire(self) -> list[Upload]:
        """Drop uploads idle past the timeout; returns them (files already removed)."""
        now = time.monotonic()
        gone = [u for u in self._uploads.values() if now - u.last_active > self.idle_timeout_s]
        for upload in gone:
            if upload.lock.locked():
                continue
            del self._uploads[upload.id]
            upload.discard()
            log.warning(
                "upload %s expired after %.0f s without a chunk (%d of %d bytes)",
                upload.id,
                self.idle_timeout_s,
                upload.received,
                upload.size,
            )
        return [u for u in gone if u.id not in self._uploads]

    def close(self) -> None:
        for upload in self._uploads.values():
            upload.discard()
        self._uploads.clear()


def _locked(path: Path) -> bool:
    """Whether a live process holds ``path``'s lock (an upload in progress or in commit)."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # gone meanwhile
        return False
    return False


def _remove(path: Path) -> int:
    """Delete a file or folder; returns the bytes it held."""
    try:
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path, ignore_errors=True)
            return size
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        return size
    except OSError:
        return 0
