"""Model packages: open a folder or ``.tar.gz``, check it is safe and intact, write one.

A package holds ``model.json`` (:class:`~lensbus.schemas.Manifest`) and the files it
lists, each checked against its sha256 before anything loads it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from lensbus.errors import PackageError
from lensbus.schemas import SCHEMA_VERSION, Manifest, ModelFile

MANIFEST = "model.json"
# A package larger than this is refused before it is unpacked (a zip bomb, a wrong file).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# A package is a manifest and a handful of files; more members than this is an attack (100,000
# empty files took 23.5 s to unpack in the deployer and 80 s in inference), refused while
# the headers are read, before anything is written.
MAX_MEMBERS = 256


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Package:
    """A verified package: its manifest and the folder its files are in."""

    manifest: Manifest
    root: Path

    def path(self, role: str) -> Path:
        """The verified file for ``role`` (e.g. ``symbol``, ``params``, ``model``)."""
        try:
            return self.root / self.manifest.files[role].path
        except KeyError:
            raise PackageError(f"{self.manifest.ref}: no file with role {role!r}") from None


def read_manifest(data: bytes | str, where: str = MANIFEST) -> Manifest:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise PackageError(f"{where}: not JSON ({exc})") from None
    if isinstance(obj, dict) and obj.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise PackageError(f"{where}: schema version {obj['v']} is not {SCHEMA_VERSION}")
    try:
        return Manifest.model_validate(obj)
    except ValidationError as exc:
        errs = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise PackageError(f"{where}: {errs}") from None


def _check_member(member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")):
        raise PackageError(f"unsafe archive member {member.name!r}: absolute path")
    if ".." in name.parts:
        raise PackageError(f"unsafe archive member {member.name!r}: '..' leaves the package")
    if member.issym() or member.islnk():
        raise PackageError(f"unsafe archive member {member.name!r}: links are not allowed")
    if not (member.isfile() or member.isdir()):
        raise PackageError(f"unsafe archive member {member.name!r}: not a regular file")
    return name


def _checked_members(tar: tarfile.TarFile, name: str, max_bytes: int) -> list[tarfile.TarInfo]:
    """Every member's header, checked (path, kind, running size, count) as it is read: a
    .tar.gz has no index, so stopping at the first member over a limit is what keeps a
    refusal cheap."""
    members: list[tarfile.TarInfo] = []
    total = 0
    for m in tar:
        if len(members) >= MAX_MEMBERS:
            raise PackageError(f"{name}: more than {MAX_MEMBERS} members (the limit)")
        _check_member(m)
        total += m.size
        if total > max_bytes:
            raise PackageError(f"{name}: unpacks to more than {max_bytes} bytes")
        members.append(m)
    return members


def extract_archive(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Unpack a ``.tar.gz`` package into ``dest`` after checking every member is safe.

    Returns the package root: ``dest`` or its single top-level folder.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _checked_members(tar, archive.name, max_bytes)
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
                tar.extractall(dest, members=members, filter="data")
            else:  # Debian 12's Python 3.11.2: every member was checked above
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PackageError(f"{archive.name}: not a readable .tar.gz ({exc})") from None
    if (dest / MANIFEST).is_file():
        return dest
    # An archive without members unpacks nothing: not even ``dest`` is made.
    subdirs = [p for p in dest.iterdir() if p.is_dir()] if dest.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST).is_file():
        return subdirs[0]
    raise PackageError(f"{archive.name}: no {MANIFEST} at the top of the archive")


def verify(root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Package:
    """Read ``model.json`` in ``root`` and check every listed file's size and sha256."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(f"{root}: no {MANIFEST}")
    manifest = read_manifest(manifest_path.read_bytes(), str(manifest_path))
    resolved_root = root.resolve()
    total = 0
    for role, entry in manifest.files.items():
        path = (root / entry.path).resolve()
        if not path.is_relative_to(resolved_root):
            raise PackageError(f"{manifest.ref}: file {entry.path!r} ({role}) leaves the package")
        if not path.is_file():
            raise PackageError(f"{manifest.ref}: file {entry.path!r} ({role}) is missing")
        size = path.stat().st_size
        total += size
        if total > max_bytes:
            raise PackageError(f"{manifest.ref}: files exceed the {max_bytes}-byte limit")
        if size != entry.size:
            raise PackageError(
                f"{manifest.ref}: file {entry.path!r} ({role}) is {size} bytes, "
                f"manifest says {entry.size}"
            )
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise PackageError(
                f"{manifest.ref}: sha256 mismatch for {entry.path!r} ({role}): "
                f"file {digest[:12]}..., manifest {entry.sha256[:12]}..."
            )
    return Package(manifest=manifest, root=root)


def open_package(
    path: str | Path, workdir: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Package:
    """Open and verify a package folder or ``.tar.gz``.

    An archive is unpacked into ``workdir`` (a new temporary folder by default), which
    must live as long as the returned package is used.
    """
    path = Path(path)
    if path.is_dir():
        return verify(path, max_bytes)
    if not path.is_file():
        raise PackageError(f"{path}: no such model package")
    dest = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lensbus-model-"))
    return verify(extract_archive(path, dest, max_bytes), max_bytes)


def file_entry(root: Path, rel: str) -> ModelFile:
    path = root / rel
    return ModelFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size)


def write_package(root: Path, files: dict[str, str], **manifest: Any) -> Package:
    """Write ``model.json`` for files already in ``root`` (role -> relative path)."""
    entries = {role: file_entry(root, rel) for role, rel in files.items()}
    m = Manifest(files=entries, **manifest)
    (root / MANIFEST).write_text(m.model_dump_json(indent=2, exclude_defaults=False) + "\n")
    return verify(root)


def pack(root: Path, archive: Path) -> Path:
    """Write a package folder as a ``.tar.gz`` (regular files only, relative names)."""
    pkg = verify(root)
    # Level 1: weights hardly compress, and level 9 costs seconds on a 30 MB model.
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(MANIFEST)
        data = (root / MANIFEST).read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for entry in pkg.manifest.files.values():
            tar.add(root / entry.path, arcname=entry.path, recursive=False)
    return archive


# ------------------------------------------------------------------------------ unpacking aside


async def open_package_aside(
    archive: Path, workdir: Path, max_bytes: int = DEFAULT_MAX_BYTES
) -> Package:
    """``open_package`` for an archive, done by a child process at a low CPU priority.

    For a service that keeps serving meanwhile: unpacking and hashing a 33 MB package is
    ~0.4 s of CPU, which a child at nice 10 takes mostly from idle time, and still gets when
    the cores are saturated.  A thread
    at a low priority would not do: it holds the GIL between its chunks, and while the
    scheduler keeps it off the CPU, the service's event loop waits for the GIL (measured:
    frames lost in a swap).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(archive),
        str(workdir),
        str(max_bytes),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise PackageError(lines[-1] if lines else f"unpacking exited with {proc.returncode}")
    root = Path(out.decode().strip())
    # The child verified every file; the manifest it checked them against is read here.
    return Package(manifest=read_manifest((root / MANIFEST).read_bytes()), root=root)


# The child lowers its priority before it imports anything (pydantic and lensbus take ~0.3 s
# of CPU to import): nice 10, about a tenth of a core while the services want every core.
# Not SCHED_IDLE, which never runs while anything else is runnable, nor nice 19 (~1 %): with
# the cores saturated (two inference instances behind a fast camera) a swap then took minutes
# or never got its package unpacked.  Frames slowed meanwhile wait (Worker.holding).
_CHILD = """
import os, sys
try:
    os.nice(10 - os.nice(0))
except OSError:
    pass
from lensbus.modelpkg import _main
sys.exit(_main(sys.argv[1:]))
"""


def _main(argv: list[str]) -> int:
    """The child of ``open_package_aside``: unpack, verify, print the package root."""
    archive, workdir, max_bytes = argv
    try:
        pkg = open_package(archive, Path(workdir), int(max_bytes))
    except PackageError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(pkg.root)
    return 0
