"""`make demo`: a counter container under the kybernate runtime is checkpointed, deleted, restored,
and carries on counting. Runs on a private containerd from the test stack (make stack)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import images  # noqa: E402
from harness.containerd import Containerd  # noqa: E402
from harness.stack import load_stack  # noqa: E402

from harness.workload import COUNTER  # noqa: E402

RUNTIME = "io.containerd.kybernate.v1"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def last_count(c: Containerd, seq: list[int]) -> int:
    seq[0] += 1
    out = c.ctr("tasks", "exec", "--exec-id", f"demo{seq[0]}", "counter", "tail", "-n1", "/count").stdout
    return int(out.strip())


def main() -> int:
    version = sys.argv[1] if len(sys.argv) > 1 else "2.1"
    stack = load_stack()
    c = Containerd(stack, version, extra_path=[Path(sys.executable).parent])
    seq = [0]
    try:
        say(f"starting a private containerd {stack.containerd[version].version} (state under {c.dir})")
        c.start()
        with tempfile.TemporaryDirectory() as d:
            images.import_image(c, images.busybox_image(Path(d), stack.busybox))
        say(f"ctr run -d --runtime {RUNTIME} {images.BUSYBOX_IMAGE} counter sh -c '<count 5 times a second>'")
        c.ctr("run", "-d", "--runtime", RUNTIME, images.BUSYBOX_IMAGE, "counter", "sh", "-c", COUNTER)
        time.sleep(2)
        print(c.ctr("tasks", "ls").stdout.rstrip())
        before = last_count(c, seq)
        print(f"counter is at {before}")

        say("ctr containers checkpoint --task --rw counter kyb.local/demo/counter:1")
        started = time.monotonic()
        c.ctr("containers", "checkpoint", "--task", "--rw", "counter", "kyb.local/demo/counter:1")
        print(f"checkpoint took {time.monotonic() - started:.2f} s")
        at_checkpoint = last_count(c, seq)

        say("deleting the task and the container")
        c.ctr("tasks", "rm", "-f", "counter")
        c.ctr("containers", "rm", "counter")
        print(c.ctr("containers", "ls").stdout.rstrip())

        say("ctr containers restore --live --rw counter kyb.local/demo/counter:1")
        started = time.monotonic()
        c.ctr("containers", "restore", "--live", "--rw", "counter", "kyb.local/demo/counter:1")
        print(f"restore took {time.monotonic() - started:.2f} s")
        print(c.ctr("tasks", "ls").stdout.rstrip())
        time.sleep(1)
        after = last_count(c, seq)
        print(f"counter was at about {at_checkpoint} at the checkpoint and is at {after} now")
        if after <= before:
            print("FAILED: the counter did not continue", file=sys.stderr)
            return 1
        say("the restored container carried on counting from its checkpoint")
        return 0
    finally:
        c.stop()


if __name__ == "__main__":
    sys.exit(main())
