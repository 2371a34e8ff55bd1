"""Project folders: what ``lensbus.projects.package`` refuses (naming the cause), packing
(deterministic, nothing extra) and unpacking (safe); the ``lensbus project init`` template.

The import check runs the handler in a real child process, as the deployer does."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from lensbus.errors import PackageError
from lensbus.projects import package, scaffold
from lensbus.schemas.project import MAX_PROJECT_BYTES

GOOD_HANDLER = "def on_result(result, ctx):\n    pass\n"


def project(tmp: Path, code: str | None = GOOD_HANDLER, **fields: object) -> Path:
    """A project folder with a project.json of ``fields`` (over a minimal one)."""
    tmp.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"name": "p1", "version": "1"}
    manifest.update(fields)
    (tmp / "project.json").write_text(json.dumps(manifest))
    if code is not None:
        (tmp / "handler.py").write_text(code)
    return tmp


def refused(root: Path) -> str:
    with pytest.raises(PackageError) as info:
        package.check(root, timeout_s=20)
    return str(info.value)


def test_scaffold_passes_every_check_and_packs(tmp_path: Path) -> None:
    root = scaffold.init("hello", tmp_path / "hello")
    manifest = package.check(root)
    assert (manifest.name, manifest.version, manifest.groups) == ("hello", "1", ["default"])
    assert manifest.models == [] and manifest.settings == {"label": "person"}
    assert "label" in manifest.settings_schema["properties"]
    assert len((root / "README.md").read_text().splitlines()) == 10
    handler = (root / "handler.py").read_text()
    for call in ('ctx.publish("count"', "ctx.overlay(", "ctx.event(", "ctx.state.set("):
        assert call in handler
    assert package.member_names(package.pack(root)) == ["README.md", "handler.py", "project.json"]
    with pytest.raises(PackageError, match="not an empty folder"):
        scaffold.init("hello", root)
    with pytest.raises(PackageError, match="project name"):
        scaffold.init("bad.name", tmp_path / "x")


@pytest.mark.parametrize(
    ("fields", "cause"),
    [
        ({"handlr": "h.py"}, "handlr: Extra inputs are not permitted"),
        ({"limits": {"deadline_s": 0}}, "limits.deadline_s: Input should be greater than 0"),
        ({"name": "a.b"}, "name:"),
        ({"runtime": "lambda"}, "runtime:"),
        ({"handler": "../x.py"}, "handler:"),
        ({"groups": ["a", "a"]}, "a group is listed twice"),
        ({"models": ["yolo"]}, "models.0:"),
    ],
)
def test_bad_project_json_is_refused_naming_the_field(
    tmp_path: Path, fields: dict[str, object], cause: str
) -> None:
    text = refused(project(tmp_path, **fields))
    assert text.startswith("project.json: ") and cause in text, text


def test_project_json_not_json_or_missing(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "project.json").write_text("{name: p1")
    assert "project.json: not JSON" in refused(root)
    (root / "project.json").unlink()
    assert "no project.json" in refused(root)


def test_settings_failing_their_schema(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string"}, "n": {"type": "integer", "minimum": 1}},
        "required": ["label"],
    }
    text = refused(project(tmp_path / "a", settings={"label": 5, "n": 0}, settings_schema=schema))
    assert "settings.label: 5 is not of type 'string'" in text
    assert "settings.n: 0 is less than the minimum of 1" in text
    text = refused(project(tmp_path / "b", settings={}, settings_schema=schema))
    assert "settings: 'label' is a required property" in text
    bad_schema = {"type": "object", "properties": {"label": {"type": "strng"}}}
    text = refused(project(tmp_path / "c", settings_schema=bad_schema))
    assert "settings_schema" in text and "not a valid JSON Schema" in text
    ok = project(tmp_path / "d", settings={"label": "dog", "n": 2}, settings_schema=schema)
    assert package.check(ok).settings == {"label": "dog", "n": 2}


@pytest.mark.parametrize(
    ("handler", "cause"),
    [
        (None, "handler: handler.py is not in the project (the handler file is missing)"),
        ("def on_start(ctx):\n    pass\n", "handler.py: no on_result(result, ctx) function"),
        ("def on_result(result, ctx)\n    pass\n", "handler.py: syntax error at line 1"),
        ("import no_such_module_here\n", "No module named 'no_such_module_here'"),
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        ("on_result = 5\n", "handler.py: on_result is not a function"),
        (GOOD_HANDLER + "on_stop = 'x'\n", "handler.py: on_stop is not a function"),
    ],
)
def test_bad_handlers_are_refused_naming_the_cause(
    tmp_path: Path, handler: str | None, cause: str
) -> None:
    assert cause in refused(project(tmp_path, handler))


def test_the_import_runs_in_a_child_with_a_limit_and_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler's module sees the project's folder (helpers import) and none of the
    # caller's LENSBUS_* variables; a module that loops at import is cut off.
    monkeypatch.setenv("LENSBUS_DEPLOYER_SECRET", "s3cret")
    root = project(
        tmp_path / "ok",
        "import os, helper\nassert 'LENSBUS_DEPLOYER_SECRET' not in os.environ\n" + GOOD_HANDLER,
    )
    (root / "helper.py").write_text("X = 1\n")
    assert package.check(root).name == "p1"
    loops = project(tmp_path / "loop", "while True:\n    pass\n")
    with pytest.raises(PackageError, match="took longer than 2 s"):
        package.check(loops, timeout_s=2)


def test_what_the_import_starts_dies_with_the_check(tmp_path: Path) -> None:
    """Before, a process started at import outlived the check (in the deployer)."""
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess\n"
        f"p = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "def on_result(result, ctx): pass\n"
    )
    package.check(project(tmp_path, code))
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the process the handler started at import is still running"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_deeplens_scripts_are_compiled_not_run(tmp_path: Path) -> None:
    loop = "import awscam\nwhile True:\n    awscam.getLastFrame()\n"
    root = project(tmp_path / "a", loop, runtime="deeplens")
    assert package.check(root).runtime == "deeplens"  # would never return if imported
    bad = project(tmp_path / "b", "while True\n    pass\n", runtime="deeplens")
    assert "handler.py: syntax error at line 1" in refused(bad)


def test_pack_is_deterministic_and_leaves_out_byte_code(tmp_path: Path) -> None:
    root = project(tmp_path / "p")
    (root / "lib").mkdir()
    (root / "lib" / "data.txt").write_text("x")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "handler.cpython-313.pyc").write_bytes(b"\0")
    (root / "lib" / "old.pyc").write_bytes(b"\0")
    a = package.pack(root)
    (root / "lib" / "data.txt").touch()  # a new mtime: the same archive
    assert package.pack(root) == a
    assert package.member_names(a) == ["handler.py", "lib/data.txt", "project.json"]
    with tarfile.open(fileobj=io.BytesIO(a), mode="r:gz") as tar:
        assert {(m.mtime, m.uid, m.uname) for m in tar.getmembers()} == {(0, 0, "")}
    out = package.unpack(a, tmp_path / "out")
    assert (out / "lib" / "data.txt").read_text() == "x"
    assert package.check(out).name == "p1"
    (root / "link.py").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="links"):
        package.pack(root)


def targz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


MANIFEST = json.dumps({"name": "p1", "version": "1"}).encode()


@pytest.mark.parametrize(
    ("archive", "cause"),
    [
        (targz({"project.json": MANIFEST, "../evil.py": b"x"}), "'..' leaves the package"),
        (targz({"project.json": MANIFEST, "/etc/evil.py": b"x"}), "absolute path"),
        (targz({"project.json": MANIFEST}, {"handler.py": "/etc/passwd"}), "links are not"),
        (targz({"handler.py": b"x"}), "no project.json at the top"),
        (b"not a tarball", "not a readable .tar.gz"),
        (targz({f"f{i}": b"" for i in range(package.MAX_MEMBERS + 1)}), "more than 4096"),
    ],
)
def test_unsafe_archives_are_refused_before_writing(
    tmp_path: Path, archive: bytes, cause: str
) -> None:
    dest = tmp_path / "deep" / "out"
    with pytest.raises(PackageError) as info:
        package.unpack(archive, dest)
    assert cause in str(info.value)
    assert not list(tmp_path.rglob("evil.py"))
    if "at the top" not in cause:  # refused while the headers were read: nothing written
        assert not dest.exists()


def test_size_limits(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="over the 10 limit"):
        package.unpack(b"x" * 11, tmp_path / "o", max_bytes=10)
    big = targz({"project.json": MANIFEST, "data.bin": b"\0" * 5000})
    with pytest.raises(PackageError, match="unpacks to more than 4000 bytes"):
        package.unpack(big, tmp_path / "o2", max_bytes=4000)
    root = project(tmp_path / "p")
    (root / "data.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(PackageError, match="exceed the 4000-byte limit"):
        package.pack(root, max_bytes=4000)
    assert MAX_PROJECT_BYTES == 64 * 1024 * 1024


def test_check_from_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = scaffold.init("cli-check", tmp_path / "c")
    run = [sys.executable, "-m", "lensbus.projects.package", "check"]
    # A relative folder, as a user types it.
    r = subprocess.run([*run, "c"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok cli-check:1", r.stderr
    (root / "handler.py").write_text("x = (\n")
    r = subprocess.run([*run, str(root)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "handler.py: syntax error at line 1" in r.stderr
