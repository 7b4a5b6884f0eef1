"""Logging for the shim daemon: logfmt lines into the bundle's `log` fifo, where containerd reads them."""

from __future__ import annotations

import logging
import os

# stdlib-only module: the same line format as kybernate-hookd's logs.
from kybernate.hooks.api.logs import LogfmtFormatter

LOG_FIFO = "log"


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
    handler.setFormatter(LogfmtFormatter(static={"runtime": "io.containerd.kybernate.v1"}))
    root.addHandler(handler)

