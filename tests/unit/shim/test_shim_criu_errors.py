"""CRIU's reason for a failed dump or restore, taken from its log in one line."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kybernate.shim import criu_errors

DUMP_LOG = """\
(00.000000) Version: 4.2 (gitid 0)
(00.005000) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.010000) ========================================
(00.010001) Dumping task (pid: 1718 comm: pt_data_worker)
(00.010002) ========================================
(00.020000) Error (criu/files-reg.c:1122): Can't create link remap for /dev/shm/sem.YzJrg9. Use link-remap option.
(00.020001) Error (criu/cr-dump.c:1500): Dump files (pid: 1718) failed with -1
(00.020002) Error (criu/cr-dump.c:2100): Dumping FAILED.
"""

RESTORE_LOG = """\
(00.000000) Version: 4.2 (gitid 0)
(00.100000)      1: Restoring fd 3 (state -> prepare)
(00.100500)      7: Error (criu/files-reg.c:2000): File tmp/corpus-state.bin has bad size 128 (expect 64)
(00.100600)      1: Error (criu/cr-restore.c:1500): 7 exited, status=1
"""


def test_dump_names_the_task_and_the_resource() -> None:
    failure = criu_errors.parse(DUMP_LOG.splitlines())
    assert failure is not None
    assert failure.pid == 1718 and failure.comm == "pt_data_worker"
    assert failure.describe() == (
        "pid 1718 (pt_data_worker): Can't create link remap for /dev/shm/sem.YzJrg9. Use link-remap option.; "
        "Dump files (pid: 1718) failed with -1"
    )


def test_a_pid_named_in_the_error_wins_over_the_task_being_dumped() -> None:
    log = DUMP_LOG.replace("(00.020000) Error (criu/files-reg.c:1122): Can't create link remap for "
                           "/dev/shm/sem.YzJrg9. Use link-remap option.",
                           "(00.020000) Error (criu/proc_parse.c:663): "
                           "Can't handle non-regular mapping on 1720's map 200600000")
    failure = criu_errors.parse(log.splitlines())
    assert failure is not None and failure.pid == 1720 and failure.comm is None
    assert failure.reason.startswith("Can't handle non-regular mapping on 1720's map 200600000")


def test_restore_uses_the_log_lines_pid() -> None:
    failure = criu_errors.parse(RESTORE_LOG.splitlines())
    assert failure is not None and failure.pid == 7
    assert failure.reason.startswith("File tmp/corpus-state.bin has bad size 128 (expect 64)")


def test_a_live_dumped_process_gets_its_name_from_proc() -> None:
    log = f"(00.1) Error (criu/sk-inet.c:200): Can't dump socket of pid {os.getpid()}\n"
    failure = criu_errors.parse(log.splitlines(), live_pids=True)
    assert failure is not None and failure.pid == os.getpid()
    assert failure.comm == Path("/proc/self/comm").read_text().strip()


def test_no_error_lines_no_failure() -> None:
    assert criu_errors.parse(["(00.1) Dumping task (pid: 3 comm: sh)", "(00.2) Dumping finished successfully"]) is None


def test_reason_is_one_bounded_line() -> None:
    log = f"(00.1) Error (x.c:1): {'a' * 5000}\n(00.2) Error (x.c:2): second\n(00.3) Error (x.c:3): third\n"
    failure = criu_errors.parse(log.splitlines())
    assert failure is not None and "\n" not in failure.describe()
    assert len(failure.reason) == criu_errors.MAX_REASON_CHARS and "third" not in failure.reason


def test_explain_reads_a_fresh_dump_log_and_ignores_a_stale_one(tmp_path: Path) -> None:
    log = tmp_path / criu_errors.DUMP_LOG
    log.write_text(DUMP_LOG)
    message = criu_errors.explain("dump", "criu failed: type NOTIFY errno 0", str(tmp_path), time.time())
    assert message.startswith("criu dump failed: pid 1718 (pt_data_worker): Can't create link remap for /dev/shm/sem")
    assert message.endswith(f"(CRIU log: {log})")
    old = time.time() - 3600
    os.utime(log, (old, old))
    assert criu_errors.explain("dump", "runc said no", str(tmp_path), time.time()) == "runc said no"


def test_explain_restore_reads_the_work_dir_log(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "restore.log").write_text(RESTORE_LOG)
    message = criu_errors.explain("restore", "OCI runtime restore failed", str(tmp_path), time.time())
    assert message.startswith("criu restore failed: pid 7: File tmp/corpus-state.bin has bad size")


def test_explain_without_a_log_keeps_the_message(tmp_path: Path) -> None:
    assert criu_errors.explain("restore", "boom", str(tmp_path), time.time()) == "boom"


def test_harmless_errors_are_skipped_and_whitespace_folded() -> None:
    log = ("(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
           "(00.2) Dumping task (pid: 42 comm: python3)\n"
           "(00.3) Error (criu/fsnotify.c:300): fsnotify: \tCan't dump that handle\n")
    failure = criu_errors.parse(log.splitlines())
    assert failure is not None and failure.describe() == "pid 42 (python3): fsnotify: Can't dump that handle"
