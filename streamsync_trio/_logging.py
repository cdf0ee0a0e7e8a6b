"""Structured logs: one line per request and per download, as text or JSON.

Events carry their fields in ``extra={"event": ..., ...}``; the formatters render them as
``key=value`` pairs or as one JSON object a line.  The access line itself is written by the
HTTP edge (``edge/_access_log``).  No formatter ever reads request headers, so credentials
cannot reach a log line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

# Fields of our events, in the order text lines show them.
EVENT_FIELDS = (
    "event",
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "source",
    "digest",
    "upstream",
    "repository",
    "size",
    "subscribers",
    "upstream_requests",
    "resumes",
    "reason",
    "offset",
)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{key}={getattr(record, key)}" for key in EVENT_FIELDS if hasattr(record, key)]
        return f"{line} {' '.join(fields)}" if fields else line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            if hasattr(record, key):
                document[key] = getattr(record, key)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


_URL_QUERY_RE = re.compile(r"(https?://[^\s'\"?]*)\?[^\s'\">]*")


class RedactURLQueries(logging.Filter):
    """Cut the query off every absolute URL a log line contains, at every level.

    Blob downloads are redirected to signed CDN or S3 URLs whose query is a credential until
    it expires; httpx and httpcore name such URLs when they log.  Request paths in our own
    access log are relative, so their queries (``?ns=``) stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _URL_QUERY_RE.sub(r"\1?<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure(format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactURLQueries())
    handler.setFormatter(JSONFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every upstream request at INFO; ours says the same with more context.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
