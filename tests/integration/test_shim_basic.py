"""First contact: the kybernate runtime runs containers under real containerd."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness.images import BUSYBOX_IMAGE

pytestmark = pytest.mark.stack
RUNTIME = "io.containerd.kybernate.v1"
VENV_BIN = Path(sys.executable).parent


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_run_rm_prints_and_exits(containerd_factory, version):
    c = containerd_factory(version, extra_path=[VENV_BIN])
    r = c.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_IMAGE, "t1", "sh", "-c", "echo hello; exit 7", check=False)
    assert r.stdout.strip() == "hello", r.stderr
    assert r.returncode == 7
