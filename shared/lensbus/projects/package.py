"""A project folder: read and check it, pack it into a ``.tar.gz``, unpack one safely.

What :func:`check` refuses, with a message naming the cause:

- ``project.json`` that is not JSON or does not fit :class:`ProjectManifest` (the field is
  named: ``project.json: limits.deadline_s: Input should be greater than 0``; an unknown key
  is refused by name);
- settings failing their ``settings_schema`` (``project.json: settings.label: 5 is not of
  type 'string'``), or a schema that is not a JSON Schema;
- a handler file that is missing; for runtime ``handler`` a module that does not import or
  has no callable ``on_result`` (``on_start``/``on_stop`` optional, callables when there);
  for runtime ``deeplens`` a script that does not compile (importing it would run its loop).

The import is done by a child process (``python -m lensbus.projects.package import-check
DIR``) with a time limit, an address-space limit and none of the caller's ``LENSBUS_*``
variables: the user's code never runs in the deployer's (or the CLI's) process, and never
sees its secrets.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import jsonschema
from pydantic import ValidationError

from lensbus.errors import PackageError
from lensbus.modelpkg import _check_member
from lensbus.schemas.project import MANIFEST_FILE, MAX_PROJECT_BYTES, ProjectManifest

# Longest a handler module may take to import in the check.
IMPORT_TIMEOUT_S = 30.0
# Address space of the import check's child (MiB): numpy and OpenCV import within it.
IMPORT_MEMORY_MB = 2048
# A project is code and small files; more members than this is refused while the headers are
# read, before anything is written (a vendored library of a few hundred files fits).
MAX_MEMBERS = 4096
# Left out of a packed project: byte code and version control (rebuilt or not needed).
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")
# Environment variables the import check's child keeps (everything else, secrets included,
# stays with the caller).
CHILD_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR", "HOME")
HANDLERS = ("on_start", "on_result", "on_stop")


# ---- project.json ----------------------------------------------------------------------------


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def read_manifest(data: bytes | str, where: str = MANIFEST_FILE) -> ProjectManifest:
    """``project.json`` as a :class:`ProjectManifest`; a :class:`PackageError` naming the
    field (every bad field, ``;``-separated) otherwise."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{where}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise PackageError(f"{where}: must be a JSON object, not {type(obj).__name__}")
    try:
        return ProjectManifest.model_validate(obj)
    except ValidationError as exc:
        errs = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise PackageError(f"{where}: {errs}") from None


def check_settings(manifest: ProjectManifest, where: str = MANIFEST_FILE) -> None:
    """The settings against their JSON Schema, the failing setting's path named."""
    schema = manifest.settings_schema
    if not schema:
        return
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise PackageError(
            f"{where}: settings_schema{'.' + path if path else ''}: not a valid JSON Schema "
            f"({exc.message})"
        ) from None
    errors = sorted(
        validator_cls(schema).iter_errors(manifest.settings), key=lambda e: list(e.path)
    )
    if errors:
        text = "; ".join(
            f"settings{''.join('.' + str(p) for p in e.path)}: {e.message}" for e in errors
        )
        raise PackageError(f"{where}: {text} (settings_schema)")


# ---- the handler -----------------------------------------------------------------------------


def _handler_path(root: Path, manifest: ProjectManifest) -> Path:
    path = (root / manifest.handler).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PackageError(f"{MANIFEST_FILE}: handler: {manifest.handler} leaves the project")
    if not path.is_file():
        raise PackageError(
            f"{MANIFEST_FILE}: handler: {manifest.handler} is not in the project "
            f"(the handler file is missing)"
        )
    return path


def compile_check(path: Path, name: str) -> None:
    """A script that must not be imported (it runs as it loads): it compiles, or the
    syntax error is named with its line."""
    try:
        compile(path.read_bytes(), name, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise PackageError(f"{name}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # null bytes
        raise PackageError(f"{name}: not Python source ({exc})") from None


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in CHILD_ENV}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the folder checked stays as it was
    return env


def import_check(root: Path, manifest: ProjectManifest, timeout_s: float) -> None:
    """Import the handler module in a child process; refuse with the child's reason."""
    root = root.resolve()  # the child runs in the folder
    # A session of its own: whatever the import starts goes with it (killpg), and a
    # timeout kills the whole group, not only the child.
    # stderr into a file, not a pipe: a process the import started may hold it open.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lensbus.projects.package", "import-check", str(root)],
            cwd=root,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PackageError(
                f"{manifest.handler}: importing it took longer than {timeout_s:g} s "
                "(does it run a loop at import? the runtime 'handler' wants on_result)"
            ) from None
        finally:
            _kill_group(proc)
            proc.wait()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"the import check exited with {proc.returncode}"
        raise PackageError(reason.replace(f"{root}/", ""))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def check(root: str | Path, timeout_s: float = IMPORT_TIMEOUT_S) -> ProjectManifest:
    """Every check of a project folder (see the module's docstring); its manifest if all
    pass."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise PackageError(f"{root}: no {MANIFEST_FILE} (is this a project folder?)")
    manifest = read_manifest(path.read_bytes())
    check_settings(manifest)
    handler = _handler_path(root, manifest)
    if manifest.runtime == "deeplens":
        compile_check(handler, manifest.handler)
    else:
        import_check(root, manifest, timeout_s)
    return manifest


def _import_handler(root: Path, manifest: ProjectManifest) -> None:
    """In the child: import the handler file as the host does and check its functions."""
    import importlib.util
    import resource

    limit = IMPORT_MEMORY_MB * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    path = _handler_path(root, manifest)
    compile_check(path, manifest.handler)
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # the user's code: anything may come out of it
        raise PackageError(
            f"{manifest.handler}: importing it raised {type(exc).__name__}: {exc}"
        ) from None
    if not hasattr(module, "on_result"):
        raise PackageError(
            f"{manifest.handler}: no on_result(result, ctx) function: the runtime 'handler' "
            "calls it for every result"
        )
    for name in HANDLERS:
        if hasattr(module, name) and not callable(getattr(module, name)):
            raise PackageError(f"{manifest.handler}: {name} is not a function")


# ---- packing ---------------------------------------------------------------------------------


def _files(root: Path) -> list[tuple[str, Path]]:
    """(archive name, path) of every file to pack, sorted; links refused."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise PackageError(f"{Path(dirpath, d).relative_to(root)}: links are not packed")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            if path.is_symlink() or not path.is_file():
                raise PackageError(f"{rel}: links and special files are not packed")
            out.append((rel, path))
    return sorted(out)


def pack(root: str | Path, max_bytes: int = MAX_PROJECT_BYTES) -> bytes:
    """The project folder as a ``.tar.gz``, the same bytes for the same files (sorted
    members, times 0, no owners, no byte code), at most ``max_bytes``."""
    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        raise PackageError(f"{root}: no {MANIFEST_FILE} (is this a project folder?)")
    buf = io.BytesIO()
    total = 0
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, path in _files(root):
            data = path.read_bytes()
            total += len(data)
            if total > max_bytes:
                raise PackageError(f"{root}: its files exceed the {max_bytes}-byte limit")
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            tar.addfile(info, io.BytesIO(data))
    out = buf.getvalue()
    if len(out) > max_bytes:
        raise PackageError(f"{root}: packed it is {len(out)} bytes, over the {max_bytes} limit")
    return out


def _checked_members(tar: tarfile.TarFile, max_bytes: int) -> list[tarfile.TarInfo]:
    """Every member checked as its header is read (modelpkg's member check: no absolute
    path, no '..', no link, regular files and folders only), with the count and size caps."""
    members: list[tarfile.TarInfo] = []
    total = 0
    for m in tar:
        if len(members) >= MAX_MEMBERS:
            raise PackageError(f"the archive has more than {MAX_MEMBERS} members (the limit)")
        _check_member(m)
        total += m.size
        if total > max_bytes:
            raise PackageError(f"the archive unpacks to more than {max_bytes} bytes")
        members.append(m)
    return members


def unpack(data: bytes, dest: str | Path, max_bytes: int = MAX_PROJECT_BYTES) -> Path:
    """Unpack a packed project into ``dest`` (checked before anything is written); returns
    the project root (``dest``, or the archive's single top folder)."""
    dest = Path(dest)
    if len(data) > max_bytes:
        raise PackageError(f"the archive is {len(data)} bytes, over the {max_bytes} limit")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = _checked_members(tar, max_bytes)
            dest.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
                tar.extractall(dest, members=members, filter="data")
            else:  # every member was checked above
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise PackageError(f"not a readable .tar.gz ({exc})") from None
    if (dest / MANIFEST_FILE).is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST_FILE).is_file():
        return subdirs[0]
    raise PackageError(f"no {MANIFEST_FILE} at the top of the archive")


def manifest_of_archive(data: bytes) -> ProjectManifest:
    """``project.json`` of a packed project, read without unpacking the rest."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar:
                parts = PurePosixPath(m.name).parts
                if m.isfile() and parts[-1:] == (MANIFEST_FILE,) and len(parts) <= 2:
                    member = tar.extractfile(m)
                    if member is not None:
                        return read_manifest(member.read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PackageError(f"not a readable .tar.gz ({exc})") from None
    raise PackageError(f"no {MANIFEST_FILE} in the archive")


def member_names(data: bytes) -> list[str]:
    """The names in a packed project (for tests and ``lensbus project deploy``'s summary)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return [str(PurePosixPath(m.name)) for m in tar.getmembers()]


# ---- the child -------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    """``check DIR``: every check, ``ok NAME:VERSION`` or the reason (exit 1);
    ``import-check DIR``: the child of :func:`import_check`."""
    if len(argv) != 2 or argv[0] not in ("check", "import-check"):
        print("usage: python -m lensbus.projects.package check|import-check DIR", file=sys.stderr)
        return 2
    root = Path(argv[1])
    try:
        if argv[0] == "check":
            manifest = check(root)
            print(f"ok {manifest.name}:{manifest.version}")
        else:
            manifest = read_manifest((root / MANIFEST_FILE).read_bytes())
            _import_handler(root, manifest)
    except (PackageError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: a thread the user's module started at import must not keep the check alive.
    os._exit(code)
