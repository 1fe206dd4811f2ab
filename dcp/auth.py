"""Credentials, sans-I/O: signed route numbers and agent tokens (stdlib ``hmac``).

One secret, shared by the orchestrator and the brokers (a file, ``--secret-file``),
keys two independent MACs, so neither can stand in for the other:

* a **route tag** binds a stream's topology number X to its topic, epoch and expiry.
  The orchestrator signs it; a broker with ``--verify-routes`` forwards a data frame
  only if its tag is genuine and unexpired, so a publisher cannot forge X to reach
  agents it was not given.  On the wire the 24-byte tag follows X in the X field and
  the ``SIGNED_ROUTE`` flag says so (see :mod:`dcp.wire`).
* an **agent token** names an agent, its role and an expiry.  The orchestrator
  issues it; brokers and the orchestrator started with ``--require-token`` admit a
  connection only with a valid one.

Nothing here reads a clock: callers pass ``now`` (seconds since the epoch).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shlex
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .errors import AuthError, ConfigError
from .wire import ROUTE_TAG_SIZE

__all__ = [
    "MIN_SECRET_BYTES",
    "SECRET_MODE_FORBIDDEN",
    "ROUTE_TAG_SIZE",
    "Claims",
    "RouteSigner",
    "RouteVerifier",
    "load_secret",
    "issue_token",
    "expiry",
    "verify_token",
    "admit",
    "ISSUED_ROLES",
    "DEFAULT_TOKEN_TTL_S",
    "MAX_TOKEN_TTL_S",
    "TOKEN_ROLES",
    "REFUSALS",
]

MIN_SECRET_BYTES = 16
#: Mode bits a secret file must not have: read or write for its group or for others.
SECRET_MODE_FORBIDDEN = 0o066
_TAG = struct.Struct("!II")
_MAC_SIZE = 16
_TOKEN_PREFIX = "dcp1"


def load_secret(path: str | Path) -> bytes:
    """The shared secret in ``path`` (surrounding whitespace ignored).

    Raises:
        ConfigError: unreadable; shorter than 16 bytes; readable or writable by its
            group or others (as ssh refuses such a private key; ``chmod 600`` fixes it).
    """
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode  # of the file read, not of what the path names later
            secret = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the secret in {path} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
    if os.name == "posix" and stat.S_ISREG(mode) and mode & SECRET_MODE_FORBIDDEN:
        raise ConfigError(
            f"the secret file {path} is {'readable' if mode & 0o044 else 'writable'} by its group or others "
            f"(mode {stat.S_IMODE(mode):03o}): anyone who reads it can forge tokens and route tags; "
            f"run: chmod 600 {shlex.quote(str(path))}"
        )
    return secret


def _subkey(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, b"dcp " + purpose, hashlib.sha256).digest()


def _route_mac(key: bytes, topic: bytes, x_bytes: bytes, stamp: bytes) -> bytes:
    message = len(topic).to_bytes(2, "big") + topic + stamp + x_bytes
    return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_SIZE]


class RouteSigner:
    """The orchestrator's side: tags for (topic, X, epoch, expiry)."""

    def __init__(self, secret: bytes) -> None:
        self._key = _subkey(secret, b"route")

    def sign(self, topic: str, x: int, epoch: int, expires: int) -> bytes:
        """The 24-byte tag that travels after X."""
        x_bytes = x.to_bytes((x.bit_length() + 7) // 8, "big")
        stamp = _TAG.pack(epoch & 0xFFFFFFFF, expires)
        return stamp + _route_mac(self._key, topic.encode(), x_bytes, stamp)


class RouteVerifier:
    """The broker's side: checks tags, remembering the genuine ones (bounded).

    A stream's frames repeat one (X, topic, tag), so after the first frame a check
    is one dictionary lookup and a comparison with the expiry.
    """

    def __init__(self, secret: bytes, cache_size: int = 4096) -> None:
        self._key = _subkey(secret, b"route")
        self._genuine: dict[bytes, int] = {}  # X field + topic -> expiry
        self._cache_size = cache_size

    def check(self, route_field: bytes, x_len: int, topic: bytes, now: float) -> str | None:
        """None if the frame may pass, else the drop reason.

        ``route_field`` is the whole X field (X, then the tag); ``x_len`` the bytes
        of X in it.  Reasons: ``route_forged`` (the MAC does not match: X, topic,
        epoch or expiry altered, or another secret), ``route_expired``.
        """
        key = route_field + topic
        expires = self._genuine.get(key)
        if expires is None:
            stamp = route_field[x_len : x_len + _TAG.size]
            mac = route_field[x_len + _TAG.size :]
            if len(mac) != _MAC_SIZE or not hmac.compare_digest(mac, _route_mac(self._key, topic, route_field[:x_len], stamp)):
                return "route_forged"
            expires = _TAG.unpack(stamp)[1]
            if len(self._genuine) >= self._cache_size:
                self._genuine.clear()
            self._genuine[key] = expires
        if now >= expires:
            return "route_expired"
        return None


class Claims(NamedTuple):
    """What a valid token says."""

    name: str
    role: str
    expires: int


def _token_key(secret: bytes) -> bytes:
    return _subkey(secret, b"token")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(secret: bytes, name: str, role: str, expires: int) -> str:
    """A token for agent ``name`` in ``role`` (``agent``, ``admin`` ...) valid until ``expires``."""
    body = json.dumps({"name": name, "role": role, "exp": int(expires)}, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(_token_key(secret), body, hashlib.sha256).digest()
    return f"{_TOKEN_PREFIX}.{_b64(body)}.{_b64(mac)}"


def expiry(now: float, ttl_s: object) -> int:
    """When a token issued at ``now`` for ``ttl_s`` seconds expires.

    Raises:
        ConfigError: ``ttl_s`` is not a number of seconds in (0, MAX_TOKEN_TTL_S].
    """
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise ConfigError(f"ttl_s must be a positive number of seconds, at most {MAX_TOKEN_TTL_S:.0f}; got {ttl_s!r}")
    return int(now + ttl_s)


def verify_token(secret: bytes, token: object, now: float, *, check: Callable[[Claims], None] | None = None) -> Claims:
    """The claims of a genuine, unexpired ``token``.

    Raises:
        AuthError: ``token_missing``, ``token_malformed``, ``token_forged`` or
            ``token_expired``; or what ``check`` raises for valid claims.
    """
    if not token:
        raise AuthError("token_missing", "this server admits only connections with a token (see dcp token)")
    if not isinstance(token, str) or token.count(".") != 2:
        raise AuthError("token_malformed", "the token is not of the form dcp1.BODY.MAC")
    prefix, body_b64, mac_b64 = token.split(".")
    try:
        body, mac = _unb64(body_b64), _unb64(mac_b64)
    except ValueError:
        raise AuthError("token_malformed", "the token is not valid base64url") from None
    if prefix != _TOKEN_PREFIX:
        raise AuthError("token_malformed", f"unknown token version {prefix!r}")
    if not hmac.compare_digest(mac, hmac.new(_token_key(secret), body, hashlib.sha256).digest()):
        raise AuthError("token_forged", "the token was not issued with this server's secret, or was altered")
    try:
        fields = json.loads(body)
        claims = Claims(str(fields["name"]), str(fields["role"]), int(fields["exp"]))
    except (ValueError, KeyError, TypeError):
        raise AuthError("token_malformed", "the token's claims are unreadable") from None
    if now >= claims.expires:
        raise AuthError("token_expired", f"the token of {claims.name!r} expired")
    if check is not None:
        check(claims)
    return claims


#: The roles of the tokens the orchestrator issues (the admin op ``token``, ``dcp token``).
ISSUED_ROLES = ("agent", "admin")
DEFAULT_TOKEN_TTL_S = 24 * 3600.0
MAX_TOKEN_TTL_S = 10 * 365 * 24 * 3600.0
#: The token role each hello role needs: brokers present a ``broker`` token, self-issued
#: from the shared secret, both on a peer link (hello role ``peer``) and to the orchestrator.
TOKEN_ROLES = {"agent": "agent", "admin": "admin", "peer": "broker", "broker": "broker"}
#: The codes of the error frame that refuses a hello for its token.
REFUSALS = frozenset({"token_missing", "token_malformed", "token_forged", "token_expired", "token_role", "token_name"})


def admit(secret: bytes, hello: Mapping[str, Any], now: float) -> Claims:
    """The claims of the token a ``hello`` carries, if they admit it.

    The token must be genuine and unexpired, of the role the hello's role needs
    (:data:`TOKEN_ROLES`) and, but for admins, issued to the name the hello gives
    (an empty name takes the token's): the orchestrator's policy rules go by name.

    Raises:
        AuthError: as :func:`verify_token`, or ``token_role``, ``token_name``.
    """
    role = hello.get("role", "agent")
    name = hello.get("name") or ""

    def fits(claims: Claims) -> None:
        needed = TOKEN_ROLES.get(role) if isinstance(role, str) else None
        if claims.role != needed:
            raise AuthError("token_role", f"a {role} connection needs a {needed} token; this one is a {claims.role} token")
        if role != "admin" and name and claims.name != name:
            raise AuthError("token_name", f"the token was issued to {claims.name!r}, not to {name!r}")

    return verify_token(secret, hello.get("token"), now, check=fits)
