"""procfs.process_tree: a process and everything below it, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

from kybernate.hooks.api import procfs


def test_the_tree_holds_the_root_its_children_and_grandchildren() -> None:
    # sh -> sleep: a child with a child of its own; the pipe tells us both pids once they exist.
    child = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = 0
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = procfs.process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree and grandchild in tree
        assert procfs.process_tree(child.pid) == [child.pid, grandchild]
    finally:
        for pid in (grandchild, child.pid):
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        child.wait()


def test_a_process_that_is_gone_has_no_tree() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert procfs.process_tree(int(done.stdout)) == []
