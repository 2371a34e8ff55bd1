"""NATS auth callout: nats-server asks the projects service who an unknown user is.

Usage (the projects service)::

    from lensbus import natsauth
    from lensbus.natscallout import CalloutService

    seed = os.environ[natsauth.CALLOUT_SEED_ENV]        # the issuer's account seed "SA..."
    authorize = natsauth.project_authorizer(seed, prefix, exists=lambda name: name in running)
    callout = CalloutService(nc, seed, authorize)        # nc: connected as the user `projects`
    await callout.start()                                # ... await callout.stop()
    callout.counts                                       # Counter: allowed, refused, invalid, error

    # the host of project P connects as natsauth.project_user(P) ("project-P") with the
    # password natsauth.project_password(seed, P); NATS itself enforces
    # natsauth.project_permissions(P, prefix).

Config-file users cannot be added while nats-server runs, so each project's user comes from
the callout (nats-server 2.10+, ``server/auth_callout.go``). In config mode every configured
user is listed in ``auth_callout { auth_users }`` and bypasses it; any other user's CONNECT is
sent, as an ``authorization_request`` JWT signed by the server's own nkey, on
:data:`~lensbus.subjects.AUTH_CALLOUT_SUBJECT` in the global account ``$G``. The answer is an
``authorization_response`` JWT signed by the issuer (an account nkey, ``auth_callout.issuer``):
``sub`` the request's ``user_nkey`` (a fresh key per CONNECT: no replay), ``aud`` the server's
id, and either ``jwt`` (a ``user`` JWT with the same ``sub``, issued by the issuer, ``aud`` the
account to place the user in, ``$G`` here, with its permissions) or ``error``.

The claims are those of nats-io/jwt v2 (``authorization_claims.go``, ``user_claims.go``):
header ``{"typ":"JWT","alg":"ed25519-nkey"}``, base64url without padding, the ed25519
signature of ``header.payload`` by the issuer, and ``jti`` the base32 SHA-512/256 of the
standard claims as that package computes it (the server does not check it; kept faithful).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from lensbus.logs import RateLimit, log_limited
from lensbus.subjects import AUTH_CALLOUT_QUEUE_GROUP, AUTH_CALLOUT_SUBJECT

log = logging.getLogger("lensbus.natscallout")

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
# The account configured users live in (nats-server's global account in config mode).
GLOBAL_ACCOUNT = "$G"
# nats-io/jwt's libVersion: claims of version 2 are signed over "header.payload".
JWT_VERSION = 2
# Connections a project user may open: plain NATS clients, not MQTT or websocket ones.
STANDARD = ("STANDARD",)
# The fields of nats-io/jwt's ClaimsData in the order Go marshals them (for ``jti``).
_CLAIMS_DATA = ("aud", "exp", "iat", "iss", "name", "nbf", "sub")

Permissions = dict[str, Any]
Authorize = Callable[[str, str], Permissions | None | Awaitable[Permissions | None]]


class CalloutError(ValueError):
    """A JWT or authorization request that cannot be trusted or read."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise CalloutError(f"not base64url: {exc}") from None


def generate_issuer() -> tuple[str, str]:
    """A fresh account nkey: (seed "SA...", public key "A...")."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
    return seed, public_key(seed)


def generate_nkey() -> str:
    """A fresh user nkey seed ("SU..."): a NATS user's secret; :func:`public_nkey` gives the
    half the server's config holds (lensbus.natsauth)."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def public_nkey(seed: str) -> str:
    """The public key ("U...") of a user seed; CalloutError if it is not one."""
    if not seed.startswith("SU"):
        raise CalloutError("not a user nkey seed (SU...)")
    return public_key(seed)


def public_key(seed: str) -> str:
    """The public nkey of a seed."""
    try:
        return str(nkeys.from_seed(seed.encode()).public_key.decode())
    except (nkeys.NkeysError, ValueError) as exc:
        raise CalloutError(f"not an nkey seed: {type(exc).__name__}") from None


def _verify_key(public: str) -> tuple[int, nacl.signing.VerifyKey]:
    """(prefix byte, ed25519 key) of a public nkey, its checksum checked."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except ValueError:
        raise CalloutError(f"not a public nkey: {public!r:.80}") from None
    if len(raw) != 35 or nkeys.crc16(bytearray(raw[:33])) != int.from_bytes(raw[33:], "little"):
        raise CalloutError(f"not a public nkey: {public!r:.80}")
    return raw[0], nacl.signing.VerifyKey(raw[1:33])


def _jti(claims: dict[str, Any]) -> str:
    data = {k: claims[k] for k in _CLAIMS_DATA if claims.get(k)}
    digest = hashlib.new("sha512_256", json.dumps(data, separators=(",", ":")).encode()).digest()
    return base64.b32encode(digest).rstrip(b"=").decode()


def encode_jwt(claims: dict[str, Any], seed: str) -> str:
    """``claims`` signed by the nkey ``seed`` (its public key becomes ``iss``; ``iat`` and
    ``jti`` are set as nats-io/jwt sets them)."""
    kp = nkeys.from_seed(seed.encode())
    body = {k: v for k, v in claims.items() if k != "jti"}
    body["iss"] = kp.public_key.decode()
    body["iat"] = int(time.time())
    body = {"jti": _jti(body), **body}
    head = _b64(json.dumps(HEADER, separators=(",", ":")).encode())
    signed = f"{head}.{_b64(json.dumps(body, separators=(',', ':')).encode())}"
    return f"{signed}.{_b64(kp.sign(signed.encode()))}"


def decode_jwt(token: str, issuer_prefix: int | None = None) -> dict[str, Any]:
    """The claims of a JWT whose signature by its ``iss`` checks out (CalloutError if not);
    ``issuer_prefix``: the kind of nkey ``iss`` must be (``nkeys.PREFIX_BYTE_SERVER``...)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise CalloutError("a JWT has three parts")
    try:
        header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CalloutError(f"not JSON: {exc}") from None
    if not isinstance(header, dict) or str(header.get("typ", "")).upper() != "JWT":
        raise CalloutError("not a JWT header")
    if str(header.get("alg", "")).lower() != HEADER["alg"]:
        raise CalloutError(f"unexpected algorithm {header.get('alg')!r:.40}")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise CalloutError("claims without an issuer")
    prefix, key = _verify_key(claims["iss"])
    if issuer_prefix is not None and prefix != issuer_prefix:
        raise CalloutError("the issuer is the wrong kind of nkey")
    try:
        key.verify(f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2]))
    except nacl.exceptions.BadSignatureError:
        raise CalloutError("bad signature") from None
    return claims


def _jwt_permissions(perms: Permissions) -> dict[str, Any]:
    """lensbus.natsauth's permissions dict as a user JWT's ``pub``/``sub``/``resp``."""
    out: dict[str, Any] = {}
    for way, key in (("publish", "pub"), ("subscribe", "sub")):
        rule = {k: list(v) for k, v in (perms.get(way) or {}).items() if k in ("allow", "deny")}
        if any(rule.values()):
            out[key] = {k: v for k, v in rule.items() if v}
    if perms.get("allow_responses"):
        # One reply per request, the server's default expiry (a ttl of 0).
        out["resp"] = {"max": 1, "ttl": 0}
    return out


def user_jwt(
    user_nkey: str,
    issuer_seed: str,
    name: str,
    permissions: Permissions,
    account: str = GLOBAL_ACCOUNT,
    connection_types: Sequence[str] = STANDARD,
) -> str:
    """The ``user`` JWT that places ``user_nkey`` in ``account`` with ``permissions``; no
    ``exp``: the server would disconnect the user when it passed."""
    nats = {
        **_jwt_permissions(permissions),
        # NoLimit (-1) as nats-io/jwt's NewUserClaims sets them.
        "subs": -1,
        "data": -1,
        "payload": -1,
        "allowed_connection_types": list(connection_types),
        "type": "user",
        "version": JWT_VERSION,
    }
    claims = {"aud": account, "name": name, "sub": user_nkey, "nats": nats}
    return encode_jwt(claims, issuer_seed)


def response_jwt(
    user_nkey: str, server_id: str, issuer_seed: str, jwt: str = "", error: str = ""
) -> str:
    """The ``authorization_response``: the user JWT, or an error (exactly one of them)."""
    if bool(jwt) == bool(error):
        raise ValueError("an authorization response holds a jwt or an error")
    nats: dict[str, Any] = {"jwt": jwt} if jwt else {"error": error}
    nats |= {"type": "authorization_response", "version": JWT_VERSION}
    return encode_jwt({"aud": server_id, "sub": user_nkey, "nats": nats}, issuer_seed)


@dataclass(frozen=True)
class AuthRequest:
    """What nats-server tells about a connecting client (never logged with its password)."""

    user_nkey: str
    server_id: str
    server_name: str
    user: str
    password: str = field(repr=False)
    client_name: str = ""
    host: str = ""


def parse_request(data: bytes) -> AuthRequest:
    """The ``authorization_request`` JWT nats-server sent, its signature by the server checked
    (CalloutError if anything is off)."""
    try:
        token = data.decode()
    except UnicodeDecodeError:
        raise CalloutError("not a JWT (binary; is the request encrypted with an xkey?)") from None
    claims = decode_jwt(token, nkeys.PREFIX_BYTE_SERVER)
    nats = claims.get("nats")
    if not isinstance(nats, dict) or nats.get("type") != "authorization_request":
        raise CalloutError("not an authorization request")
    server, opts, client = nats.get("server_id"), nats.get("connect_opts"), nats.get("client_info")
    if not isinstance(server, dict) or server.get("id") != claims["iss"]:
        raise CalloutError("the request's server id is not its signer")
    user_nkey = nats.get("user_nkey")
    if not isinstance(user_nkey, str) or _verify_key(user_nkey)[0] != nkeys.PREFIX_BYTE_USER:
        raise CalloutError("no user nkey in the request")
    opts = opts if isinstance(opts, dict) else {}
    client = client if isinstance(client, dict) else {}
    return AuthRequest(
        user_nkey=user_nkey,
        server_id=server["id"],
        server_name=str(server.get("name", "")),
        user=str(opts.get("user") or ""),
        password=str(opts.get("pass") or ""),
        client_name=str(client.get("name") or ""),
        host=str(client.get("host") or ""),
    )


class CalloutService:
    """Answers nats-server's authorization requests with ``authorize(user, password)``.

    ``authorize`` (sync or async) returns the user's permissions (the shape of
    :func:`lensbus.natsauth.permissions`) or None to refuse. ``nc`` must be allowed to
    subscribe to :data:`AUTH_CALLOUT_SUBJECT` and to answer (``allow_responses``): the
    ``projects`` user. Several services may answer: they share a queue group.

    ``counts``: decisions so far, by kind: ``allowed``, ``refused`` (authorize said no),
    ``invalid`` (a request that is not a trustworthy authorization request: left
    unanswered, so the server refuses the client), ``error`` (authorize raised: refused).
    ``on_decision(kind, reason)``, when given, is called for each (the service's metric).
    """

    def __init__(
        self,
        nc: NATS,
        issuer_seed: str,
        authorize: Authorize,
        *,
        queue: str = AUTH_CALLOUT_QUEUE_GROUP,
        on_decision: Callable[[str, str], None] | None = None,
        connection_types: Sequence[str] = STANDARD,
    ) -> None:
        self.nc = nc
        self.issuer_seed = issuer_seed
        self.issuer = public_key(issuer_seed)  # refuses a bad seed before anything runs
        self.authorize = authorize
        self.queue = queue
        self.on_decision = on_decision
        self.connection_types = tuple(connection_types)
        self.counts: Counter[str] = Counter()
        self._sub: Subscription | None = None
        self._limit = RateLimit(60.0)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(AUTH_CALLOUT_SUBJECT, queue=self.queue, cb=self._on)
        await self.nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    def _record(self, kind: str, reason: str, detail: str) -> None:
        self.counts[kind] += 1
        if self.on_decision is not None:
            self.on_decision(kind, reason)
        if kind != "allowed":
            level = logging.WARNING if kind in ("invalid", "error") else logging.INFO
            log_limited(log, self._limit, f"{kind}:{detail}", level, "auth callout: %s", detail)

    async def _on(self, msg: Msg) -> None:
        try:
            req = parse_request(msg.data)
        except CalloutError as exc:
            self._record("invalid", "bad_request", f"unreadable authorization request: {exc}")
            return
        token = await self.answer(req)
        if msg.reply:
            await msg.respond(token.encode())

    async def answer(self, req: AuthRequest) -> str:
        """The response JWT for one request (a decision recorded)."""
        who = f"user {req.user!r:.80} from {req.host or '?'}"
        try:
            perms = self.authorize(req.user, req.password)
            if inspect.isawaitable(perms):
                perms = await perms
        except Exception as exc:  # noqa: BLE001 - a broken authorizer refuses, never crashes us
            self._record("error", "authorize_failed", f"{who}: authorize raised {exc!r:.200}")
            return self._error(req, "internal error")
        if perms is None:
            self._record("refused", "denied", f"{who} refused")
            return self._error(req, "not authorized")
        user = user_jwt(
            req.user_nkey, self.issuer_seed, req.user, perms, connection_types=self.connection_types
        )
        self._record("allowed", "ok", f"{who} allowed")
        return response_jwt(req.user_nkey, req.server_id, self.issuer_seed, jwt=user)

    def _error(self, req: AuthRequest, error: str) -> str:
        return response_jwt(req.user_nkey, req.server_id, self.issuer_seed, error=error)
