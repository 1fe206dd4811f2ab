"""How dcp processes log: plain text or one JSON object per line, or a dictConfig file.

A daemon's records go to stderr.  In JSON, each line has ``time`` (UTC, ISO 8601, ms),
``level``, ``logger``, ``message``, ``daemon`` (the process's name), ``fields`` (the
``extra=`` a call passed) and, with a traceback, ``exc``: what a log shipper indexes
without parsing text.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .patterns import read_document

__all__ = ["FORMATS", "JsonFormatter", "configure"]

FORMATS = ("text", "json")
# What every LogRecord has: the rest of its attributes are the fields a call passed (extra=).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, daemon: str = "") -> None:
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line: dict[str, Any] = {
            "time": stamp, "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "daemon": self.daemon, "fields": {k: v for k, v in vars(record).items() if k not in _STANDARD},
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=repr, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "text", config_file: str = "", daemon: str = "") -> None:
    """Log the ``dcp`` loggers at ``level`` to stderr in ``fmt``; or, given ``config_file``
    (a dictConfig as TOML or JSON), exactly as that file says.

    Raises:
        ConfigError: an unknown format, or a config file that cannot be read or applied.
    """
    if config_file:
        config = _read_dict_config(Path(config_file))
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:  # what dictConfig raises for a bad config
            raise ConfigError(f"the log config {config_file} cannot be applied: {exc}") from None
        return
    if fmt not in FORMATS:
        raise ConfigError(f"log_format must be one of {FORMATS}, got {fmt!r}")
    formatter: dict[str, Any] = (
        {"()": JsonFormatter, "daemon": daemon} if fmt == "json"
        else {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}
    )
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dcp": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "dcp", "stream": "ext://sys.stderr"}},
        "loggers": {"dcp": {"level": level.upper(), "handlers": ["stderr"], "propagate": False}},
    })


def _read_dict_config(path: Path) -> dict[str, Any]:
    try:
        config = read_document(path)
    except ConfigError as exc:
        raise ConfigError(f"the log config: {exc}") from None
    config.setdefault("version", 1)
    return config
