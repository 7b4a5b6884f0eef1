"""Checkpoint with exit, then restore: the counter continues (containerd 1.6.20 and 2.1.x).

ctr cannot do this for a runtime not named io.containerd.runc.*, so the test speaks containerd's gRPC
API the way the Go client does (harness.containerd_api). The same flow under the stock runc runtime is
the control: it shows the client is right whatever our shim does.
"""

from __future__ import annotations

import pytest
from conftest import RUNTIME, processes
from harness.containerd import Containerd
from harness.containerd_api import CRIU_CHECKPOINT_MEDIA_TYPE, ContainerdApi, criu_checkpoint
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, read_counts, wait_for

pytestmark = pytest.mark.stack

RUNC_RUNTIME = "io.containerd.runc.v2"

@pytest.mark.parametrize("runtime", [RUNTIME, RUNC_RUNTIME], ids=["kybernate", "runc-control"])
def test_checkpoint_with_exit_then_restore_continues_the_counter(kyb: Containerd, runtime: str) -> None:
    name = "cnt"
    kyb.ctr("run", "-d", "--runtime", runtime, BUSYBOX_IMAGE, name, "sh", "-c", COUNTER)
    before = wait_for("the counter to start", lambda: (c := read_counts(kyb, name)) and len(c) > 3 and c)[-1]

    with ContainerdApi(kyb.address, kyb.namespace) as api:
        dumped_pid = api.get_task(name).pid
        descriptors = api.checkpoint_task(name, exit=True)
        assert CRIU_CHECKPOINT_MEDIA_TYPE in [d.media_type for d in descriptors]

        # Dumped and ended, not left running.
        wait_for("the checkpointed task to stop", lambda: api.task_status(name) == "STOPPED", timeout=5)
        wait_for("the dumped process to be gone", lambda: dumped_pid not in processes(), timeout=5)
        kyb.ctr("tasks", "delete", name)

        api.create_task_from_checkpoint(name, criu_checkpoint(descriptors))
        pid = api.start_task(name)
        assert pid > 0
        assert api.task_status(name) == "RUNNING"

        counts = wait_for("the restored counter to move on",
                          lambda: (c := read_counts(kyb, name)) and c[-1] > before + 2 and c, timeout=10)
        # One unbroken run: restored from the dump, not started afresh (that would begin at 0 again).
        assert counts == list(range(len(counts)))

        info = api.get_container(name)
        assert info.runtime.name == runtime
        kyb.ctr("tasks", "kill", "-s", "SIGKILL", name)
        wait_for("the restored task to stop", lambda: api.task_status(name) == "STOPPED", timeout=5)
        api.delete_task(name)
