"""Files holding NATS passwords (``secrets.json``, the generated ``nats-server.conf``) are
owner-only (0600) from the first byte, whatever the umask, and never half written."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest

from lensbus import natsauth
from lensbus.cli.up import load_secrets
from lensbus.natsserver import NatsServer, write_private


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask: a plain write would make the file 0644
    yield
    os.umask(old)


class Creations:
    """Every file created (``os.open`` with O_CREAT, or ``open`` for writing) and every
    rename, so a test can say how each final file came to be."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: dict[str, tuple[int, int]] = {}  # path -> (flags, mode) via os.open
        self.plain: list[str] = []  # paths opened for writing by open() / Path.write_text
        self.renamed: dict[str, str] = {}  # destination -> source
        real_os_open, real_replace, real_io_open = os.open, os.replace, __import__("io").open

        def os_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            if flags & os.O_CREAT:
                self.opened[os.fspath(path)] = (flags, mode)
            return real_os_open(path, flags, mode, **kw)

        def io_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                self.plain.append(os.fspath(file))
            return real_io_open(file, mode, *a, **kw)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            self.renamed[os.fspath(dst)] = os.fspath(src)
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr("io.open", io_open)
        monkeypatch.setattr("builtins.open", io_open)

    def assert_private(self, path: Path) -> None:
        """``path`` is 0600 now and was born 0600: renamed from a file created exclusively
        with mode 0600, never opened for writing in place."""
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
        assert str(path) not in self.plain, f"{path} written in place"
        src = self.renamed.get(str(path))
        assert src is not None, f"{path} not written through a 0600 temp file"
        flags, mode = self.opened[src]
        assert flags & os.O_EXCL and mode == 0o600, (oct(flags), oct(mode))
        assert not Path(src).exists()


def test_write_private_under_umask_022(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Creations(monkeypatch)
    target = tmp_path / "secret.txt"
    write_private(target, "one")
    spy.assert_private(target)
    target.chmod(0o644)  # rewritten over a wider file: the new one is 0600 again
    write_private(target, "two")
    spy.assert_private(target)
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]  # no temp left


async def test_up_secrets_and_server_config_are_private(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Creations(monkeypatch)
    secrets_path = tmp_path / "secrets.json"
    passwords = load_secrets(secrets_path)["passwords"]
    spy.assert_private(secrets_path)
    assert load_secrets(secrets_path)["passwords"] == passwords  # kept, not rewritten

    server = NatsServer(tmp_path / "nats", extra_config=natsauth.authorization_block(passwords))
    with server:
        spy.assert_private(server.config_path)
        assert passwords["client"] in server.config_path.read_text()
        # The real server reads the owner-only config: a user's password lets it in.
        nc = await nats_py.connect(server.url, user="client", password=passwords["client"])
        await nc.close()
