"""Structured JSON logs, one object per line, with email addresses and phone numbers masked.

Ingest already drops PII before anything is stored; masking at the log formatter is the second
line of defence for what a library (or a future bug) might print, e.g. a raw message in an
exception. Log lines never carry the raw event payload.

>>> record = logging.LogRecord("persona", logging.INFO, "x.py", 1, "bad mail %s", ("a@b.io",), None)
>>> orjson.loads(JsonFormatter().format(record))["message"]
'bad mail <email>'
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w.])\+?\d[\d ().-]{7,}\d(?![\w.])")


def mask_pii(text: str) -> str:
    """Replace email addresses and phone numbers in ``text``."""
    if "@" in text:
        text = _EMAIL.sub("<email>", text)
    return _PHONE.sub("<phone>", text)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...}`` per line; exceptions as one string."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_pii(record.getMessage()),
        }
        if record.exc_info:
            document["exception"] = mask_pii(self.formatException(record.exc_info))
        return orjson.dumps(document, default=str).decode()


def logging_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document: JSON lines on stderr at ``level``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }
