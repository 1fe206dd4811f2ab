"""The ``examples`` extra (numpy, OpenCV, scikit-image) in the tests.

What needs it is skipped, with the reason, where it is not installed (the README's test
command installs only ``.[test]``).  ``.ci/run`` then installs it and runs those tests
again with ``DCP_EXAMPLES_EXTRA=required``: a module still missing is an error there, not
a skip, so CI cannot pass them by skipping them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("DCP_EXAMPLES_EXTRA") == "required"
INSTALL = "pip install -e '.[examples]'"


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing and REQUIRED:
        raise ImportError(f"DCP_EXAMPLES_EXTRA=required, and {', '.join(missing)} cannot be imported: {INSTALL}")
    return missing


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip the test where one of ``modules`` (of the extra) is missing."""
    missing = _missing(modules)
    return pytest.mark.skipif(bool(missing), reason=f"needs the examples extra ({', '.join(missing)} missing): {INSTALL}")


def import_or_skip(name: str) -> ModuleType:
    """``name`` imported, or the whole test module skipped where it is missing."""
    if _missing((name,)):
        pytest.skip(f"needs the examples extra ({name} missing): {INSTALL}", allow_module_level=True)
    return importlib.import_module(name)
