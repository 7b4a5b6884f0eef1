"""What `kybernate checkpoint` and `prefetch` show: tqdm bars with bytes, rate and ETA on a terminal, one
line per phase otherwise, nothing with --quiet."""

from __future__ import annotations

import io
import threading

from kybernate.hooks.cli.progress import PhaseProgress


def test_not_a_terminal_one_line_per_phase_with_bytes_and_rate() -> None:
    out = io.StringIO()
    p = PhaseProgress(out, terminal=False)
    for phase, done, total in (("pause", 0, 0), ("dump", 10 << 20, 0), ("dump", 30 << 20, 40 << 20),
                               ("resume", 0, 0), ("manifest", 0, 30 << 20), ("done", 30 << 20, 30 << 20)):
        p.update(phase, done, total)
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["pause", "dump", "resume", "manifest"]
    assert "30.0 MiB" in lines[1] and "MB/s" in lines[1]
    assert "MiB" not in lines[0]


def test_a_terminal_gets_a_bar_per_phase_with_rate_and_eta() -> None:
    out = io.StringIO()
    p = PhaseProgress(out, terminal=True)
    p.update("pause")
    p.update("dump", 25 << 20, 100 << 20)
    p.update("dump", 50 << 20, 100 << 20)
    p.close()  # a bar prints its last state when it closes (between, tqdm redraws at most every 0.1 s)
    text = out.getvalue()
    assert "pause" in text and "dump" in text and "50%" in text and "50.0M/100M" in text
    assert "B/s" in text and "<" in text  # the rate, and elapsed<remaining: the ETA


def test_increments_from_transfer_threads_add_up() -> None:
    out = io.StringIO()
    p = PhaseProgress(out, terminal=True)
    threads = [threading.Thread(target=lambda: [p.add("download", 1024, 64 * 1024 * 8) for _ in range(64)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p._bytes == 8 * 64 * 1024
    p.close()
    assert "100%" in out.getvalue()


def test_quiet_shows_nothing() -> None:
    out = io.StringIO()
    p = PhaseProgress(out, quiet=True, terminal=False)
    p.update("dump", 100, 100)
    p.close()
    assert out.getvalue() == ""
