"""TLS contexts (stdlib ``ssl``) for the daemons and the clients.

A daemon serves TLS when it has a certificate and its key (``--tls-cert``,
``--tls-key``); whoever dials it (a client with a ``dcps://`` URL, a broker with
``--tls-ca``) verifies the certificate, host name included, against a CA file or the
system's CAs.  Bad files are configuration errors, reported when the daemon or the
connection is set up, not at the first handshake.
"""

from __future__ import annotations

import ssl

from .errors import ConfigError

__all__ = ["server_context", "client_context"]


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """What a daemon serves TLS with: ``cert`` (PEM, the chain) and its ``key``.

    Raises:
        ConfigError: a file is unreadable, not PEM, or the key does not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(f"cannot load the TLS certificate {cert} with key {key}: {exc.strerror or exc}") from None
    return context


def client_context(ca: str | None = None) -> ssl.SSLContext:
    """What a client verifies servers with: the CA file ``ca``, or the system's CAs.

    Raises:
        ConfigError: ``ca`` is unreadable or holds no certificate.
    """
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(f"cannot load the TLS CA file {ca}: {exc.strerror or exc}") from None
    return context
