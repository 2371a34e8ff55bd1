"""Model packages: manifest + files checked by size and sha256; archives unpacked safely.

Tiny dummy files stand in for weights: this is package logic, no model is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lensbus.modelpkg import (
    MANIFEST,
    Package,
    PackageError,
    extract_archive,
    open_package,
    pack,
    read_manifest,
    verify,
    write_package,
)

MANIFEST_FIELDS: dict[str, Any] = {
    "name": "tiny-ssd",
    "version": "1.2.0",
    "framework": "mxnet",
    "task": "detection",
    "decoder": "ssd",
    "input": {"width": 300, "height": 300, "color": "bgr", "mean": [104.0, 117.0, 123.0]},
    "labels": ["background", "person", "car"],
    "score_threshold": 0.4,
}
FILES = {"symbol": "tiny-symbol.json", "params": "tiny-0000.params"}
CONTENT = {
    "tiny-symbol.json": b'{"nodes": [], "heads": []}\n',
    "tiny-0000.params": bytes(range(256)) * 4,
}


def make_package(root: Path) -> Package:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in CONTENT.items():
        (root / rel).write_bytes(data)
    return write_package(root, FILES, **MANIFEST_FIELDS)


@pytest.fixture
def pkg_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    make_package(root)
    return root


def manifest_json(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST).read_text())


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def good_members(root: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    names = [MANIFEST, *CONTENT]
    return [(tarfile.TarInfo(n), (root / n).read_bytes()) for n in names]


# --- folder packages ----------------------------------------------------------------------


def test_write_package_then_verify_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    written = make_package(root)
    pkg = verify(root)
    assert pkg == written
    m = pkg.manifest
    assert (m.name, m.version, m.ref) == ("tiny-ssd", "1.2.0", "tiny-ssd:1.2.0")
    assert m.input.mean == (104.0, 117.0, 123.0) and m.input.color == "bgr"
    for role, rel in FILES.items():
        entry = m.files[role]
        assert entry.path == rel
        assert entry.size == len(CONTENT[rel])
        assert entry.sha256 == hashlib.sha256(CONTENT[rel]).hexdigest()
        assert pkg.path(role) == root / rel and pkg.path(role).read_bytes() == CONTENT[rel]
    # model.json is plain JSON a person can read and edit.
    on_disk = manifest_json(root)
    assert on_disk["files"]["params"]["size"] == 1024 and on_disk["v"] == 1
    assert read_manifest((root / MANIFEST).read_text()) == m


def test_unknown_role_is_a_package_error(pkg_dir: Path) -> None:
    with pytest.raises(PackageError, match="no file with role 'model'"):
        verify(pkg_dir).path("model")


def test_files_in_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "m.onnx").write_bytes(b"onnx-ish")
    pkg = write_package(
        root, {"model": "weights/m.onnx"}, **{**MANIFEST_FIELDS, "framework": "onnx"}
    )
    assert pkg.path("model").read_bytes() == b"onnx-ish"


def test_sha256_mismatch(pkg_dir: Path) -> None:
    data = bytearray(CONTENT["tiny-0000.params"])
    data[100] ^= 0xFF  # same size, one byte changed
    (pkg_dir / "tiny-0000.params").write_bytes(bytes(data))
    with pytest.raises(PackageError) as info:
        verify(pkg_dir)
    msg = str(info.value)
    assert "sha256 mismatch" in msg and "'tiny-0000.params'" in msg and "(params)" in msg
    assert "tiny-ssd:1.2.0" in msg


def test_size_mismatch(pkg_dir: Path) -> None:
    with open(pkg_dir / "tiny-symbol.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(
        PackageError,
        match=r"'tiny-symbol.json' \(symbol\) is 28 bytes, manifest says 27",
    ):
        verify(pkg_dir)


def test_missing_file(pkg_dir: Path) -> None:
    (pkg_dir / "tiny-0000.params").unlink()
    with pytest.raises(PackageError, match=r"'tiny-0000.params' \(params\) is missing"):
        verify(pkg_dir)


def test_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="no model.json"):
        verify(tmp_path / "empty")


@pytest.mark.parametrize("field", ["name", "version", "framework", "labels", "files", "input"])
def test_manifest_missing_a_field(pkg_dir: Path, field: str) -> None:
    doc = manifest_json(pkg_dir)
    del doc[field]
    (pkg_dir / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(PackageError) as info:
        verify(pkg_dir)
    assert f"{field}: Field required" in str(info.value)
    assert MANIFEST in str(info.value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"framework": "tensorflow"}, "framework"),
        ({"decoder": "yolo", "task": "classification"}, "does not fit task"),
        ({"framework": "onnx"}, "needs files ['model']"),
        ({"labels": []}, "labels"),
        ({"name": "tiny ssd"}, "name"),
        ({"unknown": 1}, "unknown"),
        ({"decoder_options": {"layout": "tf"}}, "decoder_options.layout"),
    ],
)
def test_manifest_with_bad_values(pkg_dir: Path, change: dict[str, Any], fragment: str) -> None:
    (pkg_dir / MANIFEST).write_text(json.dumps(manifest_json(pkg_dir) | change))
    with pytest.raises(PackageError, match=re.escape(fragment)):
        verify(pkg_dir)


def test_manifest_of_an_unknown_schema_version(pkg_dir: Path) -> None:
    (pkg_dir / MANIFEST).write_text(json.dumps(manifest_json(pkg_dir) | {"v": 2}))
    with pytest.raises(PackageError, match="version"):
        verify(pkg_dir)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2", "\xff"])
def test_manifest_bad_json(pkg_dir: Path, text: str) -> None:
    (pkg_dir / MANIFEST).write_text(text)
    with pytest.raises(PackageError, match="not JSON"):
        verify(pkg_dir)


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "a/../../x", "C:x"])
def test_manifest_file_path_must_stay_inside(pkg_dir: Path, bad_path: str) -> None:
    doc = manifest_json(pkg_dir)
    doc["files"]["params"]["path"] = bad_path
    (pkg_dir / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(PackageError, match="must be relative and stay inside the package"):
        verify(pkg_dir)


def test_listed_file_that_is_a_symlink_out_of_the_package(tmp_path: Path, pkg_dir: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(CONTENT["tiny-0000.params"])  # same bytes: only the link gives it away
    (pkg_dir / "tiny-0000.params").unlink()
    (pkg_dir / "tiny-0000.params").symlink_to(outside)
    with pytest.raises(PackageError, match=r"'tiny-0000.params' \(params\) leaves the package"):
        verify(pkg_dir)


def test_folder_over_the_size_limit(pkg_dir: Path) -> None:
    with pytest.raises(PackageError, match="exceed the 1000-byte limit"):
        verify(pkg_dir, max_bytes=1000)
    assert verify(pkg_dir, max_bytes=2000).manifest.name == "tiny-ssd"


def test_write_package_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_package(tmp_path, {"model": "nope.onnx"}, **{**MANIFEST_FIELDS, "framework": "onnx"})


# --- archives -------------------------------------------------------------------------------


def test_pack_then_open_package(tmp_path: Path, pkg_dir: Path) -> None:
    archive = pack(pkg_dir, tmp_path / "tiny-ssd-1.2.0.tar.gz")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted([MANIFEST, *CONTENT])
        assert all(m.isfile() for m in tar.getmembers())
    work = tmp_path / "work"
    work.mkdir()
    pkg = open_package(archive, workdir=work)
    assert pkg.root == work
    assert pkg.manifest == verify(pkg_dir).manifest
    assert pkg.path("params").read_bytes() == CONTENT["tiny-0000.params"]


def test_open_package_default_workdir_and_folder(tmp_path: Path, pkg_dir: Path) -> None:
    archive = pack(pkg_dir, tmp_path / "p.tar.gz")
    pkg = open_package(str(archive))
    try:
        assert (
            pkg.root != pkg_dir and pkg.path("symbol").read_bytes() == CONTENT["tiny-symbol.json"]
        )
    finally:
        for p in sorted(pkg.root.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        pkg.root.rmdir()
    assert open_package(pkg_dir).root == pkg_dir


def test_pack_refuses_a_broken_package(tmp_path: Path, pkg_dir: Path) -> None:
    (pkg_dir / "tiny-symbol.json").write_bytes(b"changed after the manifest was written")
    with pytest.raises(PackageError):
        pack(pkg_dir, tmp_path / "p.tar.gz")
    assert not (tmp_path / "p.tar.gz").exists()


def test_archive_with_one_top_folder(tmp_path: Path, pkg_dir: Path) -> None:
    archive = tmp_path / "nested.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pkg_dir, arcname="tiny-ssd-1.2.0")
    pkg = open_package(archive, workdir=tmp_path / "w")
    assert pkg.root.name == "tiny-ssd-1.2.0" and pkg.manifest.name == "tiny-ssd"


def test_archive_without_manifest(tmp_path: Path) -> None:
    info = tarfile.TarInfo("readme.txt")
    archive = tar_with(tmp_path / "x.tar.gz", [(info, b"hello")])
    with pytest.raises(PackageError, match="no model.json at the top of the archive"):
        open_package(archive, workdir=tmp_path / "w")


def test_not_an_archive(tmp_path: Path) -> None:
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(PackageError, match="model.tar.gz: not a readable .tar.gz"):
        open_package(bad, workdir=tmp_path / "w")


def test_truncated_archive(tmp_path: Path, pkg_dir: Path) -> None:
    archive = pack(pkg_dir, tmp_path / "p.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(PackageError, match="not a readable"):
        open_package(archive, workdir=tmp_path / "w")


def test_no_such_package(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no such model package"):
        open_package(tmp_path / "missing.tar.gz")


def _evil(kind: str) -> tarfile.TarInfo:
    if kind == "dotdot":
        return tarfile.TarInfo("../x")
    if kind == "nested-dotdot":
        return tarfile.TarInfo("pkg/../../x")
    if kind == "absolute":
        return tarfile.TarInfo("/etc/x")
    if kind == "symlink":
        info = tarfile.TarInfo("tiny-0000.params")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return info
    if kind == "symlink-relative":
        info = tarfile.TarInfo("escape")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        return info
    if kind == "hardlink":
        info = tarfile.TarInfo("tiny-0000.params")
        info.type, info.linkname = tarfile.LNKTYPE, "model.json"
        return info
    if kind == "fifo":
        info = tarfile.TarInfo("pipe")
        info.type = tarfile.FIFOTYPE
        return info
    if kind == "device":
        info = tarfile.TarInfo("dev")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        return info
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("dotdot", r"'\.\./x': '\.\.' leaves the package"),
        ("nested-dotdot", "'..' leaves the package"),
        ("absolute", "'/etc/x': absolute path"),
        ("symlink", "links are not allowed"),
        ("symlink-relative", "links are not allowed"),
        ("hardlink", "links are not allowed"),
        ("fifo", "not a regular file"),
        ("device", "not a regular file"),
    ],
)
def test_unsafe_archive_member(tmp_path: Path, pkg_dir: Path, kind: str, fragment: str) -> None:
    evil = _evil(kind)
    payload = b"pwned" if evil.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else None
    # The evil member comes last: nothing of the archive may be unpacked before refusing.
    archive = tar_with(tmp_path / "evil.tar.gz", [*good_members(pkg_dir), (evil, payload)])
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    with pytest.raises(PackageError, match=fragment) as info:
        open_package(archive, workdir=work)
    assert "unsafe archive member" in str(info.value)
    assert list(work.iterdir()) == [], "members were unpacked before the archive was refused"
    assert not (tmp_path / "deep" / "x").exists() and not (tmp_path / "x").exists()


def test_archive_over_the_size_limit(tmp_path: Path, pkg_dir: Path) -> None:
    archive = pack(pkg_dir, tmp_path / "p.tar.gz")
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(PackageError, match="unpacks to more than 500 bytes"):
        open_package(archive, workdir=work, max_bytes=500)
    assert list(work.iterdir()) == []


def test_archive_bomb_is_refused_from_headers(tmp_path: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KB: the limit is checked on the declared sizes,
    # before anything is written.
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("weights.bin")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(PackageError, match="unpacks to more than"):
        extract_archive(archive, work, max_bytes=16 << 20)
    assert list(work.iterdir()) == []


def test_extracted_files_are_plain_and_not_executable(tmp_path: Path, pkg_dir: Path) -> None:
    members = good_members(pkg_dir)
    members[1][0].mode = 0o4777  # setuid, world-writable in the archive
    archive = tar_with(tmp_path / "modes.tar.gz", members)
    root = extract_archive(archive, tmp_path / "w")
    mode = os.stat(root / members[1][0].name).st_mode
    assert not mode & 0o4000 and not mode & 0o002


def test_an_archive_without_members_is_a_package_error(tmp_path: Path) -> None:
    import tarfile

    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(PackageError, match="no model.json"):
        extract_archive(empty, tmp_path / "unpack")


async def test_a_package_is_unpacked_aside_even_with_every_core_busy(tmp_path: Path) -> None:
    """The child unpacking a swap's package runs at a low priority, never one that waits
    for idle time: with every core busy (two inference instances behind a fast camera) a
    SCHED_IDLE child never ran and the swap never finished (seen in CI, and here before the
    fix: this test timed out)."""
    import asyncio
    import subprocess
    import sys

    from lensbus.modelpkg import open_package_aside

    root = tmp_path / "pkg"
    make_package(root)
    archive = pack(root, tmp_path / "pkg.tar.gz")
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        pkg = await asyncio.wait_for(open_package_aside(archive, tmp_path / "out"), 60)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert pkg.manifest.name == MANIFEST_FIELDS["name"]
