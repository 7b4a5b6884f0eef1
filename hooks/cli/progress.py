"""What `kybernate checkpoint` shows while hookd works: one line per phase (stderr), with the phase's
seconds and, where hookd reports them, its bytes and rate."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from kybernate.hooks.api.store import human


class CheckpointProgress:
    def __init__(self, out: TextIO | None, *, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self._phase = ""
        self._since = time.monotonic()
        self._bytes = 0

    @classmethod
    def for_terminal(cls, *, quiet: bool) -> CheckpointProgress:
        return cls(sys.stderr, quiet=quiet)

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self._finish_phase()
            self._phase, self._since, self._bytes = phase, time.monotonic(), 0
        self._bytes = max(self._bytes, done)

    def close(self) -> None:
        self._finish_phase()
        self._phase = ""

    def _finish_phase(self) -> None:
        if not self._phase or self._phase == "done" or self.quiet or self.out is None:
            return
        seconds = time.monotonic() - self._since
        line = f"{self._phase}: {seconds:.2f}s"
        if self._bytes:
            line += f", {human(self._bytes)} ({self._bytes / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
        print(line, file=self.out, flush=True)
