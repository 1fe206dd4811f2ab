"""Small defensive helpers the daemons and the clients share: escaping what a peer
named before it goes into a log line, and telling when a token would travel in clear.

Pure, stdlib only; the orchestrator adopts them as the broker does: ``safe(name)``
in every log line that carries a name, a topic or a message a peer sent.
"""

from __future__ import annotations

import ipaddress
import logging
import re

__all__ = ["safe", "SAFE_LENGTH", "is_loopback", "warn_cleartext_token"]

#: What ``safe()`` keeps of a longer text (a name may be up to a control frame long).
SAFE_LENGTH = 128

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi
# overrides that a terminal or a log viewer would act on rather than show.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\\\]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(value: object, limit: int = SAFE_LENGTH) -> str:
    """``value`` as text fit for one log line: control characters (newlines included),
    line separators and bidi overrides escaped as ``\\xNN``/``\\uNNNN`` (a backslash
    doubled, so an escape cannot be forged either), cut to ``limit`` characters.

    A plain name comes out as it went in, so log formats stay as they were."""
    whole = value if isinstance(value, str) else str(value)
    text = whole[:limit]
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escape, text)
    return f"{text}...({len(whole)} chars)" if len(whole) > limit else text


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address as a socket reports it, or ``localhost``) is this host."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def warn_cleartext_token(log: logging.Logger, host: str, what: str) -> bool:
    """Log, at warning, that a token goes to ``host`` over plain TCP, unless ``host`` is a
    loopback address (nobody else sees that traffic).  True if it warned."""
    if is_loopback(host):
        return False
    log.warning(
        "%s: sending a token to %s without TLS: anyone on the path can read and reuse it "
        "(use dcps:// and a server with --tls-cert)", what, safe(host),
    )
    return True
