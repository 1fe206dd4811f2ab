"""The one exception tree of dcp.

.. code-block:: text

    DcpError
    ├── ProtocolError                 the byte stream or a frame broke the wire contract
    │   ├── LocalProtocolError        we were asked to send something invalid
    │   └── RemoteProtocolError       the peer sent something invalid
    │       ├── FrameTooLarge         a declared length is over a limit
    │       ├── RouteTooLarge         a topology number is over max_x_bits
    │       ├── TruncatedFrame        the stream ended inside a frame
    │       └── BadRequest            a control message with a field of the wrong type or range
    ├── RemoteError                   the broker answered a request with an error frame
    ├── ConnectionClosed              the connection is gone (and will not come back)
    ├── RoutingError (ValueError)     bad keys or bitmaps given to dcp.routing
    ├── ConfigError (ValueError)      bad configuration
    │   └── SpecError                 a pipeline spec is invalid (its .field says where)
    ├── AuthError                     a token or route tag is missing, forged or expired
    ├── LinkRefused                   a broker will not take a peer's hello as a link
    └── DcpTimeout (TimeoutError)     a request got no answer in time

Each error that a broker reports to a peer carries a short machine-readable
``code`` (the ``code`` class attribute, or the instance's for the errors whose
code says which case: AuthError, LinkRefused, BadRequest), sent in the error frame.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "DcpError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameTooLarge",
    "RouteTooLarge",
    "TruncatedFrame",
    "BadRequest",
    "RemoteError",
    "ConnectionClosed",
    "RoutingError",
    "ConfigError",
    "SpecError",
    "AuthError",
    "LinkRefused",
    "DcpTimeout",
    "did_you_mean",
]


class DcpError(Exception):
    """Base class of every error raised by dcp."""

    code = "error"


class ProtocolError(DcpError):
    """The wire contract was broken."""

    code = "protocol_error"


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the wire cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the wire contract."""

    code = "malformed_frame"


class FrameTooLarge(RemoteProtocolError):
    """A frame, its topic or its topology number declares more bytes than allowed."""

    code = "frame_too_large"


class RouteTooLarge(RemoteProtocolError):
    """A topology number has more bits than ``max_x_bits``."""

    code = "route_too_large"


class TruncatedFrame(RemoteProtocolError):
    """The stream ended in the middle of a frame."""

    code = "truncated_frame"


class BadRequest(RemoteProtocolError):
    """A well-framed control message whose ``field`` breaks the protocol (:mod:`dcp.control`).

    ``str()`` is ``"OP: REASON"``, and the reason names the field; ``code`` is
    ``bad_request``, or the older code clients know for that field (``bad_policy`` ...).
    Only the message is refused: the stream is intact.
    """

    code = "bad_request"

    def __init__(self, op: str, field: str, reason: str, code: str | None = None) -> None:
        super().__init__(f"{op}: {reason}" if op else reason)
        self.op = op
        self.field = field
        self.reason = reason
        if code is not None:
            self.code = code


class RemoteError(DcpError):
    """The broker answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(DcpError):
    """The connection is closed and no reconnect will happen."""

    code = "connection_closed"


class RoutingError(DcpError, ValueError):
    """Keys or bitmaps that cannot make a topology number."""

    code = "routing_error"


class ConfigError(DcpError, ValueError):
    """A configuration value is invalid."""

    code = "config_error"


class SpecError(ConfigError):
    """A pipeline spec is invalid; ``field`` says where (``stage[1].capability``), ``why`` what."""

    code = "invalid_spec"

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class DcpTimeout(DcpError, TimeoutError):
    """A request to the broker got no answer in time."""

    code = "timeout"


class AuthError(DcpError):
    """A credential is missing, malformed, forged or expired; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the choice nearest to ``word``, such as ``slow_consumer``
    for ``slow-consumer``, or ``""`` when none is near: for the errors about an unknown key."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class LinkRefused(DcpError):
    """A peer's hello that this broker will not take as a link; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
