"""Logging set-up: JSON lines for journald and log shippers, text on a terminal.

Every line logged while a request is handled carries that request's id
(``request_id``), taken from :data:`request_id_var`, which the base handler
sets for the duration of each request.

Example::

    configure_logging("auto", "INFO")
    token = request_id_var.set("5f0c...")
    logging.getLogger("executor_tornado").info("Loaded %d keys", 3)
    # {"time": "...", "level": "info", ..., "request_id": "5f0c..."}
    request_id_var.reset(token)
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time

__all__ = ["JsonFormatter", "RequestIdFilter", "configure_logging", "new_request_id", "request_id_var", "valid_request_id"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
"""The id of the request the current task handles, or ``None`` outside requests."""

_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{8,128}")

_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s]: %(message)s"


def new_request_id() -> str:
    return secrets.token_hex(8)


def valid_request_id(value: str | None) -> bool:
    """Whether a client's ``X-Request-Id`` may be reused: 8 to 128 letters, digits or ``._:-``.

    Anything else is replaced, so a client cannot write arbitrary text into
    the logs.
    """
    return bool(value) and _REQUEST_ID_PATTERN.fullmatch(value) is not None


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` from :data:`request_id_var` (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if entry.get("request_id") == "-":
            del entry["request_id"]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Send the service's loggers to stderr; ``auto`` picks text for a terminal, JSON otherwise."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
