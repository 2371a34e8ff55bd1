"""NATS connection helpers: connect forever with back-off, log and count what happens.

nats-py reconnects by itself once connected; the first connection is ours to retry, so a
service started before its NATS server waits for it instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from nats.aio.client import Client as NATS

from lensbus import metrics
from lensbus.logs import RateLimit, log_limited
from lensbus.natsauth import inbox_prefix
from lensbus.natscallout import public_nkey
from lensbus.settings import ServiceSettings
from lensbus.waiting import sleep_unless_stopped, wait_unless_stopped

log = logging.getLogger(__name__)

# Frames are large: a few MB of pending writes while reconnecting is plenty. Beyond it a
# publish fails fast (and capture counts a drop) instead of queueing without bound.
PENDING_BYTES = 8 * 1024 * 1024
# A user name that can be part of an inbox subject token.
USER_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _not_tls_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio warns at every TLS connection's end that a stream protocol's ``eof_received``
    returned True (it keeps a plain socket half-open; TLS cannot): nats-py's, harmlessly,
    each time the server closes one. Without this every service logged it on each close."""
    return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_not_tls_eof_noise)


async def _quiet(exc: Exception) -> None:
    """An error callback for short-lived connections: failures surface as exceptions."""


def split_servers(servers: str | list[str]) -> list[str]:
    """``"nats://a:4222,nats://b:4222"`` (or a list) -> the list of server URLs."""
    items = servers.split(",") if isinstance(servers, str) else servers
    return [s.strip() for s in items if s.strip()]


def _user(opts: dict[str, Any]) -> str | None:
    """The NATS user of a connection: ``user=``, else the first URL's ``user:password@`` (a
    URL with a user and no password holds a token, not a user); ``None`` when it is not one
    subject token (then no lensbus permissions are in force for it)."""
    user = opts.get("user")
    if not user and opts["servers"]:
        url = urlsplit(opts["servers"][0])
        user = unquote(url.username or "") if url.password is not None else None
    return user if user and USER_TOKEN.fullmatch(user) else None


async def connect(
    servers: str | list[str],
    *,
    name: str,
    reconnect: bool = True,
    timeout_s: float | None = None,
    **options: Any,
) -> NATS:
    """The one way lensbus opens a NATS connection (services, SDK, CLI).

    ``reconnect``: once connected, reconnect forever (a service, a watch); False for a
    command that should fail fast.  ``timeout_s`` bounds the first connection (nats-py
    would otherwise retry it forever when reconnecting is allowed).  ``options`` go to
    ``nats.connect`` as they are (credentials, TLS, callbacks).

    Replies come to the user's own inbox prefix (``lensbus.natsauth``: ``_INBOX_<user>``, the
    only inbox its permissions let it read): ``inbox_prefix=`` (what :func:`auth_options`
    sets for an nkey or creds user, whose name the server is not told), else the user of
    ``user=`` or the first URL's ``user:password@``; without a user nats-py's ``_INBOX``
    stays.
    """
    opts: dict[str, Any] = {
        "servers": split_servers(servers),
        "name": name,
        "allow_reconnect": reconnect,
        # nats-py retries the first connection forever with 0; 1 means "try twice".
        "max_reconnect_attempts": -1 if reconnect else 1,
        "reconnect_time_wait": 0.5 if reconnect else 0.2,
        "connect_timeout": 2 if timeout_s is None else min(timeout_s, 5.0),
    }
    if timeout_s is not None:
        opts["error_cb"] = _quiet
    opts.update(options)
    user = _user(opts)
    if user and "inbox_prefix" not in opts:
        opts["inbox_prefix"] = inbox_prefix(user)
    nc = NATS()
    try:
        if timeout_s is None:
            await nc.connect(**opts)
        else:
            await asyncio.wait_for(nc.connect(**opts), timeout_s)
    except BaseException:
        await _give_up(nc)
        raise
    return nc


async def _give_up(nc: NATS) -> None:
    """Close a connection nats-py gave up on: it raises a failed or timed-out first
    connection without closing its socket (nor the TLS one over it), which would then be
    found open by the garbage collector, at any later moment."""
    try:
        await asyncio.wait_for(nc.close(), 2)
    except Exception as exc:  # noqa: BLE001 - the connect's own error is the one to raise
        log.debug("closing a connection given up on: %s", exc)


def read_nkey_file(path: str | Path) -> str:
    """The user nkey seed in ``path`` (a file holding only it, as NATS's tools write it and
    nats-py reads it); ValueError naming the file and what is wrong, never the seed."""
    try:
        seed = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"nkey seed file {path}: cannot read it ({exc})") from None
    try:
        public_nkey(seed)
    except ValueError:
        raise ValueError(
            f"nkey seed file {path}: not a NATS user nkey seed (one line, SU...)"
        ) from None
    return seed


def tls_context(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """A client TLS context verifying the server with ``ca`` (else the system's CAs), with a
    client certificate when ``cert`` is given; ValueError naming a file it cannot use."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS files {ca or ''} {cert or ''}: cannot use them ({exc})") from None
    return context


def auth_options(
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds: str | Path | None = None,
    nkey_file: str | Path | None = None,
    nkey_seed: str | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`connect` options for one way of authenticating, and TLS.

    With an nkey (``nkey_file``, a file holding only the seed, which nats-py reads when it
    signs; or ``nkey_seed`` itself) ``user`` is not sent: the server knows
    the user by its key; ``user`` names its inbox (``_INBOX_<user>``, the only one its
    permissions allow). The same with ``creds`` (a JWT user). Else ``user`` and ``password``
    (or ``token``) as they are. Files are checked here, so a bad one fails before any
    connection, naming the file.
    """
    opts: dict[str, Any] = {}
    if nkey_file is not None:
        read_nkey_file(nkey_file)
        opts["nkeys_seed"] = str(nkey_file)
    elif nkey_seed is not None:
        public_nkey(nkey_seed.strip())  # a ValueError (never the seed) if it is not one
        opts["nkeys_seed_str"] = nkey_seed.strip()
    elif creds is not None:
        if not Path(creds).is_file():
            raise ValueError(f"NATS creds file {creds}: no such file")
        opts["user_credentials"] = str(creds)
    elif user:
        opts["user"] = user
        if password:
            opts["password"] = password
    if opts and "user" not in opts and user and USER_TOKEN.fullmatch(user):
        opts["inbox_prefix"] = inbox_prefix(user)
    if token:
        opts["token"] = token
    if tls_ca or tls_cert:
        opts["tls"] = tls_context(tls_ca, tls_cert, tls_key)
    return opts


def connect_options(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments for :func:`connect` from a service's settings (credentials, TLS).
    With an nkey, ``nats_user`` (default: the service's name) names its inbox."""
    opts: dict[str, Any] = {
        "name": f"{settings.service}.{settings.instance}",
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        "drain_timeout": settings.drain_timeout_s,
        "pending_size": PENDING_BYTES,
        # nats_url's order: the first server is this service's preferred node (a cluster),
        # the rest its fallbacks; nats-py would shuffle them.
        "dont_randomize": True,
    }
    keyed = settings.nats_nkey_file or settings.nats_nkey_seed or settings.nats_creds
    opts |= auth_options(
        user=settings.nats_user or (settings.service if keyed else None),
        password=settings.nats_password.get_secret_value() if settings.nats_password else None,
        token=settings.nats_token.get_secret_value() if settings.nats_token else None,
        creds=settings.nats_creds,
        nkey_file=settings.nats_nkey_file,
        nkey_seed=settings.nats_nkey_seed.get_secret_value() if settings.nats_nkey_seed else None,
        tls_ca=settings.nats_tls_ca,
        tls_cert=settings.nats_tls_cert,
        tls_key=settings.nats_tls_key,
    )
    return opts


class Bus:
    """One service's NATS connection, its state, and the callbacks that report on it."""

    def __init__(
        self, settings: ServiceSettings, on_change: Callable[[bool, str], None] | None = None
    ) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self._on_change = on_change
        self._limit = RateLimit(30.0)
        self._closing = False

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def _changed(self, up: bool, reason: str = "") -> None:
        metrics.NATS_CONNECTED.set(1 if up else 0)
        if self._on_change is not None:
            self._on_change(up, reason)

    async def _error(self, exc: Exception) -> None:
        kind = type(exc).__name__
        metrics.NATS_ERRORS.labels(kind).inc()
        log_limited(log, self._limit, kind, logging.WARNING, "NATS error: %s: %s", kind, exc)

    async def _disconnected(self) -> None:
        if self._closing:  # our own drain/close, not a lost connection
            return
        metrics.NATS_DISCONNECTS.inc()
        log.warning("disconnected from NATS; reconnecting")
        self._changed(False, "disconnected from NATS")

    async def _reconnected(self) -> None:
        metrics.NATS_RECONNECTS.inc()
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        log.info("reconnected to NATS at %s", url)
        self._changed(True)

    async def _closed(self) -> None:
        self._changed(False, "NATS connection closed")

    async def connect(self, stop: asyncio.Event | None = None) -> NATS | None:
        """Connect, retrying until it works; returns ``None`` if ``stop`` is set first.

        With reconnects allowed, nats-py keeps retrying the first connection itself
        (reporting each failure to the error callback), so we only need to be able to
        abandon it when the service is asked to stop.
        """
        self._changed(False, "connecting to NATS")
        stop = stop or asyncio.Event()
        while not stop.is_set():
            attempt = await wait_unless_stopped(
                stop,
                connect(
                    self.settings.nats_servers,
                    error_cb=self._error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    closed_cb=self._closed,
                    **connect_options(self.settings),
                ),
            )
            if attempt is None:
                return None
            exc = attempt.exception()
            if exc is None:
                self.nc = attempt.result()
                log.info("connected to NATS at %s", self.settings.nats_url)
                self._changed(True)
                return self.nc
            # A failure nats-py does not retry itself (e.g. bad credentials): retry here.
            metrics.NATS_ERRORS.labels(type(exc).__name__).inc()
            log_limited(
                log,
                self._limit,
                "connect",
                logging.WARNING,
                "cannot connect to NATS at %s (%s); retrying",
                self.settings.nats_url,
                exc,
            )
            self._changed(False, f"cannot connect to NATS: {exc}")
            await sleep_unless_stopped(stop, 2.0)
        return None

    async def close(self) -> None:
        """Drain (finish what is in flight, within the drain timeout), then close."""
        nc, self.nc = self.nc, None
        if nc is None or nc.is_closed:
            return
        self._closing = True
        try:
            if nc.is_connected:
                await nc.drain()
            else:
                await nc.close()
        except Exception as exc:  # a stop must complete even if the server is gone
            log.warning("NATS drain failed (%s); closing", exc)
            try:
                await nc.close()
            except Exception:  # noqa: S110 - already closing
                pass
