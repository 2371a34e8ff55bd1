"""Fetching what a project version needs into the cache: its packed folder from the object
store ``lensbus-projects`` (sha256 checked against the deployment record) unpacked into
``<cache_dir>/<name>/<version>``, and the models its ``project.json`` names from
``lensbus-models``, each unpacked once into ``<cache_dir>/_models/<name>-<version>`` and
linked from ``<cache_dir>/<name>/<version>.models/`` (the folder a host gets as
``LENSBUS_PROJECT_MODELS``: the models its project.json names, no other).

A folder in the cache is only ever complete: each is unpacked beside its final name and
renamed into place.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from pathlib import Path

import nats.errors
from nats.js.errors import NotFoundError

from lensbus.errors import PackageError
from lensbus.modelpkg import open_package
from lensbus.projects import package
from lensbus.runtime import Runtime
from lensbus.schemas.deploy import object_name
from lensbus.schemas.project import (
    MANIFEST_FILE,
    ProjectManifest,
    ProjectRelease,
    project_object_name,
)
from lensbus_projects import metrics

MODELS_DIR = "_models"


def _link_all(folder: Path, links: dict[str, Path]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, target in links.items():
        (folder / name).symlink_to(target, target_is_directory=True)


class FetchFailed(Exception):
    """A version that cannot be run: the cause in one line (it goes into the report)."""


class FetchUnavailable(FetchFailed):
    """The store could not be read now (NATS unreachable, a timeout): tried again later, not
    a failure of the version."""


def _store_error(name: str, bucket: str, exc: Exception) -> FetchFailed:
    why = str(exc) or type(exc).__name__
    if isinstance(exc, NotFoundError):
        metrics.FETCHES.labels("missing").inc()
        return FetchFailed(f"{name} not in {bucket} ({why})")
    metrics.FETCHES.labels("unavailable").inc()
    return FetchUnavailable(f"{bucket} not readable now ({why})")


def _replace(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    src.rename(dest)


class Fetcher:
    def __init__(self, rt: Runtime, cache: Path) -> None:
        self.rt = rt
        self.cache = cache
        self.models = cache / MODELS_DIR

    async def _download(self, bucket: str, name: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            store = await self.rt.nc.jetstream().object_store(bucket)
            with open(dest, "wb") as out:  # noqa: ASYNC230 - local file, written in chunks
                await store.get(name, writeinto=out)
        except (NotFoundError, nats.errors.Error) as exc:
            raise _store_error(name, bucket, exc) from None

    async def project(self, name: str, release: ProjectRelease) -> tuple[Path, ProjectManifest]:
        """The unpacked folder of ``name`` at ``release`` and its manifest."""
        dest = self.cache / name / release.version
        if not (dest / MANIFEST_FILE).is_file():
            await self._fetch_project(name, release, dest)
        try:
            manifest = ProjectManifest.model_validate_json((dest / MANIFEST_FILE).read_bytes())
        except ValueError as exc:
            raise FetchFailed(f"{MANIFEST_FILE}: {str(exc).splitlines()[0]}") from None
        if manifest.name != name or manifest.version != release.version:
            raise FetchFailed(
                f"{MANIFEST_FILE} names {manifest.name}:{manifest.version}, "
                f"the record {name}:{release.version}"
            )
        return dest, manifest

    async def _fetch_project(self, name: str, release: ProjectRelease, dest: Path) -> None:
        obj = project_object_name(name, release.version)
        try:
            bucket = self.rt.subjects.projects_bucket
            store = await self.rt.nc.jetstream().object_store(bucket)
            data = (await store.get(obj)).data or b""
        except (NotFoundError, nats.errors.Error) as exc:
            raise _store_error(obj, bucket, exc) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != release.sha256:
            metrics.FETCHES.labels("sha256").inc()
            raise FetchFailed(
                f"sha256 mismatch: stored {digest[:12]}..., record {release.sha256[:12]}..."
            )
        work = Path(tempfile.mkdtemp(prefix=f".{release.version}-", dir=self._mkdir(name)))
        try:
            try:
                root = await asyncio.to_thread(package.unpack, data, work / "root")
            except (PackageError, ValueError, OSError) as exc:
                metrics.FETCHES.labels("unpack").inc()
                raise FetchFailed(f"cannot unpack: {exc}") from None
            await asyncio.to_thread(_replace, Path(root), dest)
            metrics.FETCHES.labels("ok").inc()
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    def _mkdir(self, name: str) -> Path:
        folder = self.cache / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    async def models_for(self, manifest: ProjectManifest) -> Path:
        """A folder holding (as links into the shared models folder) exactly the models
        ``manifest`` names: its host's LENSBUS_PROJECT_MODELS."""
        folder = self.cache / manifest.name / f"{manifest.version}.models"
        links = {}
        for ref in manifest.models:
            target = await self.model(ref)
            links[target.name] = target
        await asyncio.to_thread(_link_all, folder, links)
        return folder

    async def model(self, ref: str) -> Path:
        """The unpacked model package ``name:version`` (``<name>-<version>`` in the models
        folder)."""
        name, _, version = ref.partition(":")  # checked by ProjectManifest (ModelRefText)
        dest = self.models / f"{name}-{version}"
        if (dest / "model.json").is_file():
            return dest
        self.models.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.models))
        try:
            archive = work / "model.tar.gz"
            await self._download(
                self.rt.subjects.models_bucket, object_name(name, version), archive
            )
            try:
                pkg = await asyncio.to_thread(open_package, archive, work / "root")
            except PackageError as exc:
                metrics.FETCHES.labels("unpack").inc()
                raise FetchFailed(f"model {ref}: {exc}") from None
            await asyncio.to_thread(_replace, pkg.root, dest)
            metrics.FETCHES.labels("ok").inc()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return dest
