"""Files holding NATS secrets (``secrets.json``, seeds, TLS keys, the generated
``nats-server.conf``) are owner-only (0600) from the first byte, whatever the umask, and never
half written."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lensbus import natsauth
from lensbus.bus import connect as bus_connect
from lensbus.cli.up_setup import UpKeys
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
    """``lensbus up``'s secrets.json, every seed file and the TLS keys are born 0600 (their
    folders 0700); kept across starts; the server's config holds public keys, never a seed."""
    spy = Creations(monkeypatch)
    keys = UpKeys.make(tmp_path, tls=True)
    spy.assert_private(keys.path)
    assert keys.tls is not None
    seeds = {user: keys.seed_file(user) for user in natsauth.nkey_users()}
    for path in [*seeds.values(), keys.tls.key, keys.tls.ca.with_name("ca-key.pem")]:
        spy.assert_private(path)
    for folder in (seeds["client"].parent, keys.tls.ca.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    texts = {user: path.read_text() for user, path in seeds.items()}
    again = UpKeys.make(tmp_path, tls=True)  # kept, not made again
    assert again.secrets == keys.secrets
    assert {user: path.read_text() for user, path in seeds.items()} == texts

    server = NatsServer(tmp_path / "nats", extra_config=keys.server_auth(), tls=keys.tls)
    with server:
        spy.assert_private(server.config_path)
        config = server.config_path.read_text()
        assert keys.secrets["passwords"]["mqtt"] in config  # MQTT's, the one password
        assert not any(seed.strip() in config for seed in texts.values())
        # The real server reads the owner-only config: the client's key lets it in, over TLS.
        nc = await bus_connect(server.url, name="t", timeout_s=10, **keys.options("client"))
        await nc.close()
