"""The per-phase line a `start` or `delete` writes into the shim's log."""

from __future__ import annotations

import os
from pathlib import Path

from kybernate.shim import phases


def test_line_lists_phases_in_order_with_increasing_times() -> None:
    phases._marks.clear()
    phases.mark("import")
    phases.mark("spec")
    text = phases.line("start", "abc")
    assert "msg=phases" in text and "action=start" in text and "id=abc" in text
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    assert float(fields["import"]) <= float(fields["spec"])
    assert text.index(" import=") < text.index(" spec=")


def test_emit_writes_one_line_into_the_log_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "log")
    got: list[bytes] = []
    fd = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)  # containerd holds the read end
    try:
        phases._marks.clear()
        phases.mark("import")
        phases.emit(str(tmp_path), "delete", "c1")
        got.append(os.read(fd, 4096))
    finally:
        os.close(fd)
    assert got[0].endswith(b"\n") and got[0].count(b"\n") == 1
    assert b"action=delete" in got[0] and b" total=" in got[0]


def test_emit_without_a_reader_drops_the_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "log")
    phases.emit(str(tmp_path), "start", "c1")  # no reader: returns at once, line dropped
    phases.emit(str(tmp_path / "missing"), "start", "c1")  # no fifo: dropped
    fd = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert os.read(fd, 4096) == b""  # nothing was left queued in the fifo
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]
