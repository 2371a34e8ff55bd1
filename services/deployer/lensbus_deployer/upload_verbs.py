"""The upload verbs: ``upload_begin``, ``upload_chunk`` (to a file in the work dir) and
``upload_commit``, which checks the bytes, opens the package and puts it in the store once
per name and version (a version never changes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

from nats.js.errors import APIError

from lensbus.modelpkg import PackageError, open_package, sha256_file
from lensbus.schemas import (
    Manifest,
    ModelInfo,
    ModelReply,
    Reply,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    UploadStarted,
)
from lensbus.schemas.deploy import UPLOAD_CHUNK_BYTES, object_name
from lensbus_deployer import metrics
from lensbus_deployer.config import DeployerSettings
from lensbus_deployer.errors import Refused
from lensbus_deployer.jetstream import JetStream
from lensbus_deployer.model_objects import content_sha256
from lensbus_deployer.store import Store
from lensbus_deployer.uploads import Upload, Uploads, human_bytes

log = logging.getLogger(__name__)

# A commit's refusal code -> the outcome label of lensbus_deployer_uploads_total.
COMMIT_OUTCOMES = {
    "invalid_package": "invalid_package",
    "conflict": "conflict",
    "bad_request": "corrupt",
}


class UploadVerbs:
    """The three upload verbs of one deployer, on its uploads in progress and its store."""

    def __init__(
        self,
        settings: DeployerSettings,
        jetstream: JetStream,
        uploads: Uploads,
        counts: dict[str, int],
    ) -> None:
        self.s = settings
        self.jetstream = jetstream
        self.uploads = uploads
        self.counts = counts
        self._model_locks: dict[str, asyncio.Lock] = {}

    async def upload_begin(self, req: UploadBegin) -> UploadStarted:
        self.jetstream.require_store()
        try:
            upload = self.uploads.begin(req.size, req.sha256)
        except Refused as exc:
            metrics.UPLOADS.labels("refused").inc()
            raise exc
        metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
        log.info("upload %s started: %s", upload.id, human_bytes(req.size))
        return UploadStarted(upload_id=upload.id, chunk_bytes=UPLOAD_CHUNK_BYTES)

    async def upload_chunk(self, req: UploadChunk) -> Reply | None:
        if not self.uploads.owns(req.upload_id):
            return None
        upload = self.uploads.get(req.upload_id)
        async with upload.lock:
            await self.uploads.write(upload, req.offset, req.data)
        metrics.UPLOAD_BYTES.inc(len(req.data))
        return Reply()

    async def upload_commit(self, req: UploadCommit) -> ModelReply | None:
        if not self.uploads.owns(req.upload_id):
            return None
        upload = self.uploads.get(req.upload_id)
        async with upload.lock:
            upload = self.uploads.take(req.upload_id)
        metrics.UPLOADS_IN_PROGRESS.set(len(self.uploads))
        t0 = time.perf_counter()
        try:
            reply = await self._commit(upload)
        except Refused as exc:
            metrics.UPLOADS.labels(COMMIT_OUTCOMES.get(exc.code, "error")).inc()
            log.warning("upload %s refused: %s", upload.id, exc.message)
            raise
        except Exception:
            metrics.UPLOADS.labels("error").inc()
            raise
        finally:
            await asyncio.to_thread(upload.discard)
        metrics.UPLOADS.labels("created" if reply.created else "identical").inc()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - t0)
        return reply

    async def _commit(self, upload: Upload) -> ModelReply:
        store = self.jetstream.require_store()
        digest = await self.checked_digest(upload)
        manifest = await self._manifest(upload)
        content = content_sha256(manifest)
        lock = self._model_locks.setdefault(
            object_name(manifest.name, manifest.version), asyncio.Lock()
        )
        async with lock:
            stored = await self._stored_identical(store, manifest, content)
            if stored is not None:
                log.info("%s uploaded again, identical: kept the stored one", manifest.ref)
                return ModelReply(model=stored, created=False)
            info = await self._put(store, manifest, upload.path, digest, content)
        self.counts["uploads"] += 1
        log.info("stored %s: %s, sha256 %s", manifest.ref, human_bytes(info.size), digest[:12])
        with contextlib.suppress(Exception):
            await self.jetstream.update_gauges()
        return ModelReply(model=info, created=True)

    async def checked_digest(self, upload: Upload) -> str:
        """The sha256 of the bytes received, once they are all there and as announced."""
        if upload.received != upload.size:
            raise Refused(
                "bad_request",
                f"incomplete upload: {upload.received} of {upload.size} bytes arrived; "
                "upload the package again",
            )
        digest = await asyncio.to_thread(sha256_file, upload.path)
        if digest != upload.sha256:
            raise Refused(
                "bad_request",
                f"upload corrupted in transit: the bytes received have sha256 {digest[:12]}..., "
                f"the client announced {upload.sha256[:12]}...; upload the package again",
            )
        return digest

    async def _manifest(self, upload: Upload) -> Manifest:
        """The package's manifest, once the checker has unpacked and checked every file."""
        unpack = self.uploads.unpack_dir / upload.path.stem
        self.uploads.busy.add(unpack)
        try:
            package = await asyncio.to_thread(
                open_package, upload.path, unpack, self.s.max_package_bytes
            )
        except PackageError as exc:
            raise Refused("invalid_package", self._package_error(exc, upload, unpack)) from None
        finally:
            self.uploads.busy.discard(unpack)
            await asyncio.to_thread(shutil.rmtree, unpack, True)
        return package.manifest

    def _package_error(self, exc: PackageError, upload: Upload, unpack: Path) -> str:
        """The checker's reason, without this deployer's temporary paths in it."""
        text = str(exc).replace(f"{unpack}/", "").replace(str(unpack), "the package")
        text = text.replace(upload.path.name, "the archive")
        if str(self.s.max_package_bytes) in text:
            text += " (the deployer's LENSBUS_DEPLOYER_MAX_PACKAGE_BYTES)"
        return f"invalid package: {text}"

    async def _stored_identical(
        self, store: Store, manifest: Manifest, content: str
    ) -> ModelInfo | None:
        """The stored version with this content; ``None`` if none is stored; a conflict if
        one is stored with other content."""
        existing = await store.model(manifest.name, manifest.version)
        if existing is None:
            return None
        info, existing_content = existing
        if existing_content == content:
            return info
        raise Refused(
            "conflict",
            f"{manifest.ref} is already stored with different content "
            f"(sha256 {info.sha256[:12]}..., {human_bytes(info.size)}); a version "
            "never changes: give the new package another version in model.json",
        )

    async def _put(
        self, store: Store, manifest: Manifest, archive: Path, digest: str, content: str
    ) -> ModelInfo:
        try:
            return await store.put_model(manifest, archive, digest, content)
        except APIError as exc:  # e.g. the store is full (its limit, or the disk's)
            raise Refused(
                "internal",
                f"the model store did not take {manifest.ref} "
                f"({exc.description or type(exc).__name__}); if it is full, raise the "
                f"limit of the stream {store.models_stream} or free space",
            ) from None
