"""A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost.

Made with the ``openssl`` command (no Python dependency); a test that needs them is
skipped, saying why, where the command is missing.  EC keys (P-256) keep it fast.
The extensions are the ones strict verifiers ask for (CA key usage, the server's
subjectAltName, extended key usage and key identifiers).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Certs", "make_certs"]

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_SERVER_EXTENSIONS = """\
subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate: what clients trust
    cert: Path  # the server certificate, signed by the CA
    key: Path  # the server certificate's key


def make_certs(folder: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1/localhost, in ``folder``, valid for two days."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: no certificates for the TLS tests")
    certs = Certs(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca_key, request, extensions = folder / "ca.key", folder / "server.csr", folder / "server.ext"
    extensions.write_text(_SERVER_EXTENSIONS)

    def openssl_run(*args: object) -> None:
        done = subprocess.run([openssl, *map(str, args)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"openssl {args[0]} failed:\n{done.stderr}"

    openssl_run(
        "req", "-x509", *_KEY, "-days", "2", "-subj", "/CN=dcp test CA", "-keyout", ca_key, "-out", certs.ca,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl_run("req", *_KEY, "-subj", "/CN=localhost", "-keyout", certs.key, "-out", request)
    openssl_run(
        "x509", "-req", "-in", request, "-CA", certs.ca, "-CAkey", ca_key, "-set_serial", "1", "-days", "2",
        "-sha256", "-extfile", extensions, "-out", certs.cert,
    )
    return certs
