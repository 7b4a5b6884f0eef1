"""What `kybernate checkpoint` and `kybernate prefetch` show while they work, on stderr.

On a terminal: one tqdm bar per phase with its bytes, rate and ETA (ETA where the total is known: hookd
estimates the dump from the workload's resident memory after the freeze; a download knows its manifest's
size). Not on a terminal (a pipe, a log): one line per phase when it ends, with its seconds and, where there
were bytes, their size and rate. `--quiet`: nothing. Scripts read `--json` on stdout instead.

tqdm is imported only for a terminal: a pipe pays nothing for it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from kybernate.hooks.api.store import human

# Phases that carry no work of their own: not shown.
SILENT = ("done",)


class PhaseProgress:
    """update(phase, done, total) as progress arrives (from any thread); close() at the end."""

    def __init__(self, out: TextIO | None = None, *, quiet: bool = False, terminal: bool | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.quiet = quiet
        self.terminal = self.out.isatty() if terminal is None else terminal
        self._lock = threading.Lock()
        self._phase = ""
        self._since = time.monotonic()
        self._bytes = 0
        self._bar: Any = None

    def update(self, phase: str, done: int = 0, total: int = 0) -> None:
        if self.quiet:
            return
        with self._lock:
            if phase != self._phase:
                self._end_phase()
                self._phase, self._since, self._bytes = phase, time.monotonic(), 0
                if self.terminal and phase not in SILENT:
                    self._bar = self._new_bar(phase, total)
            if done > self._bytes:
                if self._bar is not None:
                    if total and self._bar.total != total:
                        self._bar.total = total
                    self._bar.update(done - self._bytes)
                self._bytes = done

    def add(self, phase: str, n: int, total: int = 0) -> None:
        """`n` more bytes of `phase` (a transfer's callback gives increments)."""
        self.update(phase, self._bytes + n if phase == self._phase else n, total)

    def close(self) -> None:
        with self._lock:
            self._end_phase()
            self._phase = ""

    def _new_bar(self, phase: str, total: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total or None, desc=phase, unit="B", unit_scale=True, unit_divisor=1024,
                    file=self.out, leave=True, dynamic_ncols=True)

    def _end_phase(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if not self._phase or self._phase in SILENT or self.quiet or self.terminal:
            return
        seconds = time.monotonic() - self._since
        line = f"{self._phase}: {seconds:.2f}s"
        if self._bytes:
            line += f", {human(self._bytes)} ({self._bytes / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
        print(line, file=self.out, flush=True)
