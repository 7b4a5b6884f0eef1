"""Logging for the shim daemon: logfmt lines into the bundle's `log` fifo, where containerd reads them."""

from __future__ import annotations

import logging
import os
import time

LOG_FIFO = "log"


class LogfmtFormatter(logging.Formatter):
    """`time=... level=... msg=... key=value` like the Go shims, so containerd's log reads alike."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = [
            f'time="{stamp}.{int(record.msecs):03d}Z"',
            f"level={record.levelname.lower()}",
            f"msg={_quote(record.getMessage())}",
            "runtime=io.containerd.kybernate.v1",
        ]
        for key, value in getattr(record, "fields", {}).items():
            fields.append(f"{key}={_quote(str(value))}")
        if record.exc_info:
            fields.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(fields)


def _quote(text: str) -> str:
    if text and all(c.isalnum() or c in "-_./:@" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class FifoHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes never block the event loop: a full or closed fifo drops the line instead."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def setup(bundle: str, debug: bool) -> None:
    """Send this process's logs to `bundle/log`; containerd opened its read end before starting us."""
    logging.raiseExceptions = False
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        fd = os.open(os.path.join(bundle, LOG_FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")
    except OSError:
        stream = open(os.devnull, "w")  # no reader (containerd gone) or no fifo: logs are dropped
    handler = FifoHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)


def fields(logger: logging.Logger, **values: object) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger that adds key=value fields (namespace, container id, RPC) to each line."""

    class _Adapter(logging.LoggerAdapter):  # type: ignore[type-arg]
        def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
            extra = dict(kwargs.pop("fields", {}))
            kwargs["extra"] = {"fields": {**values, **extra}}
            return msg, kwargs

    return _Adapter(logger, {})
