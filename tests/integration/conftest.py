"""Fixtures for tests that run containers under the kybernate runtime on private containerds."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.containerd import Containerd
from harness.gpunode import GpuNode

from kybernate.hooks.api import procfs


ROOT = Path(__file__).resolve().parents[2]
RUNTIME = "io.containerd.kybernate.v1"
# The venv's bin holds the `containerd-shim-kybernate-v1` console script; containerd finds shims on PATH.
VENV_BIN = Path(sys.executable).parent
SHIM_BINARY = "containerd-shim-kybernate-v1"
RUNC_SHIM_BINARY = "containerd-shim-runc-v2"


def runtime_config_snippet(version: str, runtime_toml: Path) -> str:
    """The shipped containerd-config snippet for this version, pointed at a test runtime.toml."""
    name = "config-v2-kybernate.toml" if version == "1.6" else "config-v3-kybernate.toml"
    text = (ROOT / "containerd-config" / name).read_text()
    text = text.replace("/usr/local/bin/containerd-shim-kybernate-v1", str(VENV_BIN / SHIM_BINARY))
    return text.replace("/etc/kybernate/runtime.toml", str(runtime_toml))


# --- the fault table: every test marked fault(name), tried and survived, printed at the end ----------

_FAULTS: dict[str, list[bool]] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    marker = item.get_closest_marker("fault")
    if marker is not None and (report.when == "call" or (report.when == "setup" and report.failed)):
        version = getattr(item, "callspec", None) and item.callspec.params.get("version")
        name = f"{marker.args[0]} [containerd {version or '2.1'}]"
        _FAULTS.setdefault(name, []).append(report.passed)
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not _FAULTS:
        return
    tr = terminalreporter
    tr.section("faults tried / survived (nothing stranded)")
    width = max(len(n) for n in _FAULTS)
    for name, results in sorted(_FAULTS.items()):
        tr.write_line(f"{name:<{width}}  tried {len(results)}  survived {sum(results)}"
                      + ("" if all(results) else "  <-- STRANDED OR FAILED"))
    total = [r for rs in _FAULTS.values() for r in rs]
    tr.write_line(f"{'total':<{width}}  tried {len(total)}  survived {sum(total)}")


@pytest.fixture
def kyb_factory(containerd_factory, tmp_path) -> Callable[..., Containerd]:
    """start(version, runtime_toml_text=None, env=None) -> containerd with the kybernate runtime registered."""

    def start(version: str, *, runtime_toml: str | None = None, env: dict[str, str] | None = None,
              netns: str | None = None) -> Containerd:
        """runtime_toml is both the CRI runtime's ConfigPath and the node default ($KYBERNATE_CONFIG) for ctr."""
        path = tmp_path / f"runtime-{version}-{netns or 'host'}.toml"
        if runtime_toml is None:
            runtime_toml = (ROOT / "containerd-config" / "runtime.toml").read_text()
        path.write_text(runtime_toml)
        return containerd_factory(
            version, extra_path=[VENV_BIN], extra_config=runtime_config_snippet(version, path),
            env={"KYBERNATE_CONFIG": str(path), **(env or {})}, netns=netns,
        )

    return start


@pytest.fixture(params=["1.6", "2.1"], ids=["ctrd1.6", "ctrd2.1"])
def kyb(request, kyb_factory) -> Containerd:
    return kyb_factory(request.param)


@pytest.fixture
def store_hookd(tmp_path: Path) -> Iterator[Callable[..., GpuNode]]:
    """start(containerd, store, *more_flags, registry=None) -> a real kybernate-hookd (fake GPU driver) that owns
    `store` for that containerd; stopped at the end. Its `socket` is what `kybernate checkpoint --socket` takes."""
    nodes: list[GpuNode] = []

    def start(c: Containerd, store: Path, *more: str, registry: Path | None = None) -> GpuNode:
        home = tmp_path / f"hookd-{len(nodes)}"
        home.mkdir()
        node = GpuNode(home, hookd_args=store_flags(c, store, registry or tmp_path / "registry.db", *more))
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def store_flags(c: Containerd, store: Path, registry: Path, *more: str) -> list[str]:
    return ["--containerd-address", str(c.address), "--store-root", str(store), "--store-registry", str(registry),
            *more]


# --- what a shim leaves on the host ---------------------------------------------------------------


def processes() -> dict[int, list[str]]:
    """pid -> argv of every process that has a command line (zombies and kernel threads have none)."""
    return {pid: list(p.argv) for pid, p in procfs.processes().items() if p.argv}


def shim_pids(c: Containerd, binary: str) -> list[int]:
    """Daemons of the given shim binary serving this containerd instance.

    Ours is forked from `start` without re-exec, so its command line still ends in `start`; the runc
    shim re-executes itself without it. Call this when no start or delete is in flight.
    """
    pids = []
    for pid, argv in c.shim_pids().items():
        if not any(Path(a).name == binary for a in argv[:2]):
            continue
        if binary == RUNC_SHIM_BINARY and "start" in argv:
            continue
        pids.append(pid)
    return pids


def mounts_under(path: str) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(path)]
