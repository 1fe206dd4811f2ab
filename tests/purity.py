"""The pure-module check shared by the codec, routing, topology and spec tests.

A module is pure when importing it (as part of a bare ``dcp`` package, so the
package ``__init__`` and its client do not come along) loads no I/O module.  The
check runs in a fresh interpreter, and each test also shows it is not vacuous by
feeding it a copy of the module with an I/O import added.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

DCP_DIR = Path(__file__).resolve().parent.parent / "dcp"

_PROBE = textwrap.dedent(
    """
    import importlib, sys, types
    pkg_dir, modules, watched = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    pkg = types.ModuleType("dcp")
    pkg.__path__ = [pkg_dir]
    sys.modules["dcp"] = pkg
    for module in modules:
        importlib.import_module("dcp." + module)
    assert "dcp.client" not in sys.modules
    print(sorted(m for m in watched if m in sys.modules))
    """
)


def loaded(modules: Iterable[str], watched: Iterable[str], pkg_dir: Path = DCP_DIR) -> str:
    """Which of ``watched`` importing ``dcp.<modules>`` from ``pkg_dir`` loads, as printed (``"[]"``: none)."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(pkg_dir), ",".join(modules), ",".join(watched)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def copy_with_import(tmp_path: Path, files: Iterable[str], target: str, imports: str) -> Path:
    """A copy of ``files`` of the package in ``tmp_path/dcp``, with ``imports`` added to ``target``."""
    fake = tmp_path / "dcp"
    fake.mkdir()
    for name in files:
        (fake / name).write_text((DCP_DIR / name).read_text())
    source = (DCP_DIR / target).read_text()
    future = "from __future__ import annotations\n"
    assert future in source
    (fake / target).write_text(source.replace(future, future + imports, 1))
    return fake
