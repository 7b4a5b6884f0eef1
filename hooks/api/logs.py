"""Structured logs for kybernate-hookd: one logfmt line per record on stderr (journald keeps them).

Fields travel as `extra={"fields": {...}}`: `time=… level=info msg="checkpointed" container=k8s.io/abc`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping


class LogfmtFormatter(logging.Formatter):
    """`static` fields go on every line (the shim adds `runtime=io.containerd.kybernate.v1`)."""

    def __init__(self, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._static = [f"{key}={_quote(value)}" for key, value in (static or {}).items()]

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"time={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
            *self._static,
        ]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            parts += [f"{key}={_quote(str(value))}" for key, value in fields.items()]
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _quote(text: str) -> str:
    if text and all(c.isalnum() or c in "-_./:@," for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(max(logging.INFO, root.level))  # its debug lines are per-call noise
