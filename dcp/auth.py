"""Credentials, sans-I/O: signed route numbers and agent tokens (stdlib ``hmac``).

Two secrets, one derived from the other, so that a broker cannot speak for the
orchestrator:

* the **orchestrator's secret** (``--secret-file`` of ``dcp orchestrator``, made with
  ``dcp secret``) issues agent and admin tokens;
* the **brokers' secret** is derived from it (``dcp secret --broker``, a text that
  starts ``dcp-broker-secret:``).  It checks route tags and tokens and issues the
  brokers' own tokens.  A broker given the orchestrator's secret derives it (and could
  issue what the orchestrator issues: give brokers the derived one).

Every key is a subkey of one of them (HMAC-SHA256 with a purpose), so no MAC can stand
in for another:

* a **route tag** binds a stream's topology number X to its topic, epoch and expiry,
  and to its producer: the producing agent's name and the root key of the broker it
  publishes on (the stream's source broker).  The orchestrator signs it; a broker with
  ``--verify-routes`` forwards a data frame arriving from an agent only if its tag is
  genuine for that agent's name (the one its connection was admitted under) and this
  broker, unexpired, and of an epoch no older than the newest one the broker has
  verified for that (producer, topic); frames arriving over a peer link are not checked
  again (their source broker did).  So a consumer that copies the X field of a frame
  it received cannot publish with it.  On the wire the 24-byte tag follows X in the X
  field and the ``SIGNED_ROUTE`` flag says so (see :mod:`dcp.wire`).
* a **token** names an agent, its role and an expiry: ``dcp1.BODY.MAC`` with a MAC
  of the brokers' secret, and for the tokens the orchestrator issues (roles ``agent``
  and ``admin``) a second MAC of its own secret: ``dcp1.BODY.MAC.MAC``.  Brokers check
  the first; the orchestrator checks both, so a token made with the brokers' secret
  admits nothing there but a broker.  Brokers and the orchestrator started with
  ``--require-token`` admit a connection only with a valid one.  A broker's own token
  (role ``broker``, which it issues itself for its hellos to peers and to the
  orchestrator) also names its **audience** (claim ``aud``: the addresses or the name
  of the server it is presented to), and a server admits a broker token only if it is
  one of them (``token_audience``): a token captured by whatever a broker was pointed
  at is of no use anywhere else.  A broker token without one is refused.

Nothing here reads a clock: callers pass ``now`` (seconds since the epoch).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import shlex
import stat
import struct
from collections.abc import Callable, Collection, Iterable, Mapping
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
    "ProducerRoutes",
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
    "ORCHESTRATOR_AUDIENCE",
    "BROKER_SECRET_PREFIX",
    "broker_secret",
    "is_broker_secret",
    "new_secret",
    "write_secret",
    "endpoint",
]

MIN_SECRET_BYTES = 16
#: Mode bits a secret file must not have: read or write for its group or for others.
SECRET_MODE_FORBIDDEN = 0o066
_TAG = struct.Struct("!II")
_MAC_SIZE = 16
_TOKEN_PREFIX = "dcp1"


def load_secret(path: str | Path) -> bytes:
    """The secret in ``path``, the orchestrator's or the brokers' (surrounding whitespace ignored).

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


def write_secret(path: str | Path, secret: bytes) -> None:
    """Write ``secret`` to a new file ``path`` of mode 0600 (FileExistsError: never
    overwritten, so a typo cannot replace the secret every token depends on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret + b"\n")


def _subkey(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, b"dcp " + purpose, hashlib.sha256).digest()


#: How the brokers' secret begins (so a daemon knows which of the two it was given).
BROKER_SECRET_PREFIX = b"dcp-broker-secret:"


def new_secret() -> bytes:
    """A fresh orchestrator's secret: 32 random bytes, in hex."""
    return os.urandom(32).hex().encode()


def is_broker_secret(secret: bytes) -> bool:
    """Whether ``secret`` is the brokers' secret (which cannot issue agent or admin tokens)."""
    return secret.startswith(BROKER_SECRET_PREFIX)


def broker_secret(secret: bytes) -> bytes:
    """The brokers' secret: ``secret`` itself if it is one, else derived from the
    orchestrator's secret ``secret`` (one way: it gives nothing of ``secret`` away)."""
    if is_broker_secret(secret):
        return secret
    return BROKER_SECRET_PREFIX + hmac.new(secret, b"dcp broker secret", hashlib.sha256).hexdigest().encode()


#: The subkey of route tags; "dcp route" keyed the tags that named no producer (refused now).
_ROUTE_PURPOSE = b"route producer"


def _field(data: bytes) -> bytes:
    """``data`` after its length (u32): the MAC's fields cannot be cut elsewhere."""
    return len(data).to_bytes(4, "big") + data


def _key_bytes(key: int) -> bytes:
    return key.to_bytes((key.bit_length() + 7) // 8, "big")


def _route_mac(key: bytes, topic: bytes, producer: bytes, broker_key: bytes, x_bytes: bytes, stamp: bytes) -> bytes:
    message = b"".join((_field(topic), _field(producer), _field(broker_key), stamp, x_bytes))
    return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_SIZE]


class RouteSigner:
    """The orchestrator's side: tags for (topic, X, epoch, expiry, producer, source broker)."""

    def __init__(self, secret: bytes) -> None:
        self._key = _subkey(broker_secret(secret), _ROUTE_PURPOSE)

    def sign(self, topic: str, x: int, epoch: int, expires: int, *, producer: str, broker_key: int) -> bytes:
        """The 24-byte tag that travels after X: valid only in frames that ``producer``
        publishes on the broker whose root key is ``broker_key``."""
        stamp = _TAG.pack(epoch & 0xFFFFFFFF, expires)
        return stamp + _route_mac(self._key, topic.encode(), producer.encode(), _key_bytes(broker_key), _key_bytes(x), stamp)


class RouteVerifier:
    """The broker's side: checks the tags of the frames its agents publish, remembering
    the genuine ones and the newest epoch of each stream (both bounded).

    ``broker_key``: this broker's root key, which a tag must name.  A stream's frames
    repeat one (producer, X field, topic), so after the first frame a check is one
    dictionary lookup and two comparisons (expiry, epoch).
    """

    def __init__(self, secret: bytes, broker_key: int, cache_size: int = 4096) -> None:
        self._key = _subkey(broker_secret(secret), _ROUTE_PURPOSE)
        self._broker_key = _key_bytes(broker_key)
        # (producer, X field, topic) -> (expiry, epoch, the stream's newest [epoch, expiry])
        self._genuine: dict[tuple[str, bytes, bytes], tuple[int, int, list[int]]] = {}
        # (producer, topic) -> [the newest epoch verified, the latest expiry seen for it]
        self._latest: dict[tuple[str, bytes], list[int]] = {}
        self._cache_size = cache_size

    def bind(self, producer: str) -> ProducerRoutes:
        """The checks for the frames of one connection, admitted as ``producer``."""
        return ProducerRoutes(self, producer)

    def check(self, route_field: bytes, x_len: int, topic: bytes, now: float, *, producer: str) -> str | None:
        """None if ``producer`` may publish the frame here, else the drop reason.

        ``route_field`` is the whole X field (X, then the tag); ``x_len`` the bytes
        of X in it.  Reasons: ``route_forged`` (the MAC does not match: X, topic,
        epoch or expiry altered, another producer, another source broker, or another
        secret), ``route_expired``, ``route_stale`` (genuine, but of an epoch older
        than one verified for this producer and topic, while that one is unexpired).
        """
        key = (producer, route_field, topic)
        entry = self._genuine.get(key)
        if entry is None:
            stamp = route_field[x_len : x_len + _TAG.size]
            mac = route_field[x_len + _TAG.size :]
            expected = _route_mac(self._key, topic, producer.encode(), self._broker_key, route_field[:x_len], stamp)
            if len(mac) != _MAC_SIZE or not hmac.compare_digest(mac, expected):
                return "route_forged"
            epoch, expires = _TAG.unpack(stamp)
            entry = self._remember(key, epoch, expires, now)
        expires, epoch, latest = entry
        if now >= expires:
            return "route_expired"
        if epoch < latest[0] and now < latest[1]:
            return "route_stale"
        return None

    def _remember(self, key: tuple[str, bytes, bytes], epoch: int, expires: int, now: float) -> tuple[int, int, list[int]]:
        """Remember a genuine tag, and the newest epoch of its stream.

        The newest epoch gives way to an older one only once its own tags have all
        expired (an orchestrator that lost its state starts again from epoch 1).  Both
        memos are emptied when full; the streams' epochs with them, since the tags
        remembered point to them.
        """
        stream = (key[0], key[2])
        latest = self._latest.get(stream)
        if latest is None:
            if len(self._latest) >= self._cache_size:
                self._latest.clear()
                self._genuine.clear()
            latest = self._latest[stream] = [epoch, expires]
        elif epoch > latest[0] or now >= latest[1]:
            latest[0], latest[1] = epoch, expires
        elif epoch == latest[0] and expires > latest[1]:
            latest[1] = expires
        if len(self._genuine) >= self._cache_size:
            self._genuine.clear()
        entry = self._genuine[key] = (expires, epoch, latest)
        return entry


class ProducerRoutes:
    """A :class:`RouteVerifier`'s checks for one connection's frames
    (:class:`dcp.forwarding.RouteCheck`): its tags must name ``producer``."""

    __slots__ = ("verifier", "producer")

    def __init__(self, verifier: RouteVerifier, producer: str) -> None:
        self.verifier = verifier
        self.producer = producer

    def check(self, route_field: bytes, x_len: int, topic: bytes, now: float) -> str | None:
        return self.verifier.check(route_field, x_len, topic, now, producer=self.producer)


class Claims(NamedTuple):
    """What a valid token says."""

    name: str
    role: str
    expires: int
    #: Whom the token may be presented to (claim ``aud``); () when it names none.
    audience: tuple[str, ...] = ()


def _token_key(secret: bytes) -> bytes:
    """The key of a token's first MAC, which brokers check."""
    return _subkey(broker_secret(secret), b"token")


def _issuer_key(secret: bytes) -> bytes | None:
    """The key of a token's second MAC (the orchestrator's); None for the brokers' secret."""
    return None if is_broker_secret(secret) else _subkey(secret, b"token orchestrator")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(secret: bytes, name: str, role: str, expires: int, audience: Iterable[str] = ()) -> str:
    """A token for agent ``name`` in ``role`` (``agent``, ``admin`` ...) valid until ``expires``;
    with an ``audience`` (a broker's own tokens), valid only at the servers it names.

    Raises:
        ConfigError: a token of another role than ``broker`` asked of the brokers' secret.
    """
    claims: dict[str, Any] = {"name": name, "role": role, "exp": int(expires)}
    aud = list(audience)
    if aud:
        claims["aud"] = aud
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    token = f"{_TOKEN_PREFIX}.{_b64(body)}.{_b64(hmac.new(_token_key(secret), body, hashlib.sha256).digest())}"
    if role == "broker":
        return token
    issuer = _issuer_key(secret)
    if issuer is None:
        raise ConfigError(
            f"the brokers' secret issues broker tokens only; a token of role {role} needs the orchestrator's secret "
            "(or ask the orchestrator: dcp token NAME --token ADMIN_TOKEN)"
        )
    return f"{token}.{_b64(hmac.new(issuer, body, hashlib.sha256).digest())}"


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

    With the orchestrator's secret, a token of any role but ``broker`` must carry its
    second MAC too: the brokers' secret cannot make one.

    Raises:
        AuthError: ``token_missing``, ``token_malformed``, ``token_forged`` or
            ``token_expired``; or what ``check`` raises for valid claims.
    """
    if not token:
        raise AuthError("token_missing", "this server admits only connections with a token (see dcp token)")
    if not isinstance(token, str) or token.count(".") not in (2, 3):
        raise AuthError("token_malformed", "the token is not of the form dcp1.BODY.MAC[.MAC]")
    prefix, body_b64, *macs_b64 = token.split(".")
    try:
        body, mac, *issued = [_unb64(part) for part in (body_b64, *macs_b64)]
    except ValueError:
        raise AuthError("token_malformed", "the token is not valid base64url") from None
    if prefix != _TOKEN_PREFIX:
        raise AuthError("token_malformed", f"unknown token version {prefix!r}")
    if not hmac.compare_digest(mac, hmac.new(_token_key(secret), body, hashlib.sha256).digest()):
        raise AuthError("token_forged", "the token was not issued with this server's secret, or was altered")
    try:
        fields = json.loads(body)
        aud = fields.get("aud", [])
        if not isinstance(aud, list) or not all(isinstance(item, str) for item in aud):
            raise TypeError("aud is not a list of strings")
        claims = Claims(str(fields["name"]), str(fields["role"]), int(fields["exp"]), tuple(aud))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AuthError("token_malformed", "the token's claims are unreadable") from None
    issuer = _issuer_key(secret)
    if issuer is not None and claims.role != "broker":
        if not issued or not hmac.compare_digest(issued[0], hmac.new(issuer, body, hashlib.sha256).digest()):
            raise AuthError(
                "token_forged", f"the {claims.role} token of {claims.name!r} was not issued by the orchestrator "
                "(made with the brokers' secret?)",
            )
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
#: from the brokers' secret, both on a peer link (hello role ``peer``) and to the orchestrator.
TOKEN_ROLES = {"agent": "agent", "admin": "admin", "peer": "broker", "broker": "broker"}
#: The codes of the error frame that refuses a hello for its token.
REFUSALS = frozenset(
    {"token_missing", "token_malformed", "token_forged", "token_expired", "token_role", "token_name", "token_audience"}
)
#: The audience of the broker tokens presented to the orchestrator (there is one per secret).
ORCHESTRATOR_AUDIENCE = "orchestrator"


def endpoint(host: str, port: int) -> str:
    """``HOST:PORT`` as audiences name an address: IPv6 in brackets, an IPv4 address
    mapped into IPv6 as IPv4, so the two ends of a connection spell it alike."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"{host}:{port}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"{ip.ipv4_mapped}:{port}"
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def admit(secret: bytes, hello: Mapping[str, Any], now: float, audiences: Collection[str] = ()) -> Claims:
    """The claims of the token a ``hello`` carries, if they admit it.

    The token must be genuine and unexpired, of the role the hello's role needs
    (:data:`TOKEN_ROLES`) and, but for admins, issued to the name the hello gives
    (an empty name takes the token's): the orchestrator's policy rules go by name.
    A ``broker`` token must also name one of ``audiences`` (what this server answers
    to: its name, its addresses) in its ``aud``.

    Raises:
        AuthError: as :func:`verify_token`, or ``token_role``, ``token_name``,
            ``token_audience``.
    """
    role = hello.get("role", "agent")
    name = hello.get("name") or ""

    def fits(claims: Claims) -> None:
        needed = TOKEN_ROLES.get(role) if isinstance(role, str) else None
        if needed is None:
            raise AuthError("token_role", f"no token admits a hello with role {role!r}")
        if claims.role != needed:
            raise AuthError(
                "token_role", f"a hello with role {role!r} needs a token of role {needed!r}; this token's role is {claims.role!r}"
            )
        if role != "admin" and name and claims.name != name:
            raise AuthError("token_name", f"the token was issued to {claims.name!r}, not to {name!r}")
        if claims.role == "broker" and not set(claims.audience) & set(audiences):
            if not claims.audience:
                raise AuthError(
                    "token_audience", "the broker token names no audience (a broker older than this server?): "
                    "broker tokens must name the server they are presented to",
                )
            raise AuthError("token_audience", f"the broker token is for {', '.join(claims.audience)}, not for this server")

    return verify_token(secret, hello.get("token"), now, check=fits)
