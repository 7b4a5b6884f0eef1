"""shim/hibernate.py's pure parts: which events are dropped, CRIU's stats image, the stdio fifos held open.
The whole Hibernate/Wake runs against real containerd, runc and CRIU in tests/integration/test_hibernate.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from kybernate.shim import events, hibernate


def hibernation() -> hibernate.Hibernation:
    proxy = events.EventsProxy("")
    return hibernate.Hibernation(service=Any, proxy=proxy)  # type: ignore[arg-type]  # the rule needs no service


def entry(container_id: str, stage: hibernate.Stage) -> hibernate.Hibernated:
    return hibernate.Hibernated(container_id=container_id, namespace="ns", bundle="/b", spec=None,  # type: ignore[arg-type]
                                create_request=b"", pid=7, was_paused=False, stdin="", stdout="", stderr="",
                                stats_type="", image="/i", stage=stage)


def test_a_hibernated_tasks_lifecycle_events_are_dropped_and_nothing_else() -> None:
    h = hibernation()
    assert h.proxy is not None and h.proxy.drop_rule is None  # nothing hibernated: the bytes are never parsed
    h.entries["a"] = entry("a", hibernate.Stage.HIBERNATING)
    h._update_rule()
    rule = h.proxy.drop_rule
    assert rule is not None
    for topic in ("/tasks/exit", "/tasks/delete", "/tasks/create", "/tasks/start"):
        assert rule(topic, "a") and not rule(topic, "b")
    assert not rule("/tasks/oom", "a") and not rule("/tasks/checkpointed", "a")
    h.entries["a"].stage = hibernate.Stage.EXITED  # stopped while hibernated: nothing of the child's to drop
    assert not rule("/tasks/exit", "a")


def test_after_a_wake_the_childs_late_task_start_is_dropped_once() -> None:
    h = hibernation()
    h._late_start.add("a")
    h._update_rule()
    rule = h.proxy.drop_rule if h.proxy else None
    assert rule is not None
    assert rule("/tasks/start", "a")
    assert h.proxy is not None and h.proxy.drop_rule is None  # nothing left to drop: the fast path again
    h._late_start.add("b")
    h._update_rule()
    rule = h.proxy.drop_rule
    assert rule is not None and not rule("/tasks/exit", "b")  # its start came first (the child's order)
    assert "b" not in h._late_start


def test_criu_stats_times_are_read_from_the_image(tmp_path: Path) -> None:
    # restore entry (field 2) with restore_time (field 4) = 214000 us, after the two magics and the size.
    restore = bytes([0x20]) + _varint(214000)
    message = bytes([0x12, len(restore)]) + restore
    path = tmp_path / "stats-restore"
    path.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08" + len(message).to_bytes(4, "little") + message)
    assert hibernate.criu_stats_s(str(path), 2, 4) == pytest.approx(0.214)
    assert hibernate.criu_stats_s(str(path), 1, 2) == 0.0  # no dump entry
    assert hibernate.criu_stats_s(str(tmp_path / "none"), 2, 4) == 0.0
    path.write_bytes(b"\xff" * 20)
    assert hibernate.criu_stats_s(str(path), 2, 4) == 0.0


def test_stdio_fifos_are_held_only_when_someone_reads_them(tmp_path: Path) -> None:
    out, err_fifo = tmp_path / "out", tmp_path / "err"
    os.mkfifo(out)
    os.mkfifo(err_fifo)
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # containerd's reader of stdout; none of stderr
    try:
        held = hibernate._hold_stdio("", str(out), str(err_fifo))
        assert len(held) == 1  # stderr: no reader to keep (ENXIO), so nothing held
        os.write(held[0], b"x")  # our end writes into containerd's reader: the fifo is held open
        assert os.read(reader, 1) == b"x"
        hibernate._release(held)
        assert held == []
        # Log URIs and plain files are not fifos: left alone.
        assert hibernate._hold_stdio("", "file:///x.log", str(tmp_path)) == []
    finally:
        os.close(reader)
    readers = hibernate._open_readers(str(out), str(err_fifo), "binary:///logger")
    try:
        assert len(readers) == 2
        writer = os.open(err_fifo, os.O_WRONLY | os.O_NONBLOCK)  # would fail ENXIO without our reader
        os.close(writer)
    finally:
        hibernate._release(readers)
    with pytest.raises(OSError) as no_reader:
        os.open(err_fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert no_reader.value.errno == errno.ENXIO


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_a_shim_that_does_not_carry_its_childs_events_refuses_to_hibernate() -> None:
    """Without the events path (no TTRPC_ADDRESS given to the shim) the dump's exit would reach containerd."""
    import asyncio

    from kybernate.shim.errors import FailedPrecondition

    h = hibernate.Hibernation(service=Any, proxy=None)  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="does not carry its runc shim's events"):
        asyncio.run(h.hibernate("a", "/i", None))
    assert h.entries == {} and h._starting == set()
