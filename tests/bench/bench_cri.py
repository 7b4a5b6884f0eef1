"""Kybernate's cost over the stock runc shim through CRI, played the way the kubelet plays it.

One private containerd (1.6 or 2.1) with two runtime handlers, `runc` (io.containerd.runc.v2) and
`kybernate` (the shipped containerd-config snippet). Each run is one pod lifecycle, timed per call on
the client side: RunPodSandbox, CreateContainer, StartContainer, StopPodSandbox, RemovePodSandbox.
Runs are paired and interleaved (runc then kybernate, then the other way round) so drift hits both
sides alike. Prints medians, the kybernate-minus-runc difference and the spread (p25..p75 of the
per-pair differences).

Usage: python tests/bench/bench_cri.py [--containerd 1.6|2.1] [--runs 30] [--resident]
With --resident a resident Kybernate process (kybernate-shimd) is started for the instance first.
Then, from containerd's log, the shim's own phases per command (`msg=phases` lines of the native client,
shim/native/shim_client.c, and of the Python path, shim/phases.py) and the pod daemons' `ready_ms`:
medians in ms since the command began.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from harness import images  # noqa: E402
from harness.containerd import CRI_NAMESPACE, Containerd  # noqa: E402
from harness.cri import CriClient  # noqa: E402
from harness.stack import load_stack  # noqa: E402

STEPS = ("RunPodSandbox", "CreateContainer", "StartContainer", "StopPodSandbox", "RemovePodSandbox")
HANDLERS = ("runc", "kybernate")


def snippet(version: str, runtime_toml: Path) -> str:
    name = "config-v2-kybernate.toml" if version == "1.6" else "config-v3-kybernate.toml"
    text = (ROOT / "containerd-config" / name).read_text()
    return text.replace("/etc/kybernate/runtime.toml", str(runtime_toml)).replace(
        "/usr/local/bin/containerd-shim-kybernate-v1", str(Path(sys.executable).parent / "containerd-shim-kybernate-v1")
    )


def listens(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
            return True
        except OSError:
            return False


def timed(step: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def pod_lifecycle(cri: CriClient, handler: str, name: str) -> dict[str, float]:
    """One pod with one container, as the kubelet would drive it; seconds per CRI call."""
    took: dict[str, float] = {}
    config = cri.pod_config(name)
    took["RunPodSandbox"], pod = timed(lambda: cri.run_pod(config, runtime_handler=handler))
    assert isinstance(pod, str)
    took["CreateContainer"], cid = timed(
        lambda: cri.create_container(pod, config, "main", images.BUSYBOX_IMAGE, command=["sleep", "3600"])
    )
    assert isinstance(cid, str)
    took["StartContainer"], _ = timed(lambda: cri.start_container(cid))
    took["StopPodSandbox"], _ = timed(lambda: cri.stop_pod(pod))
    took["RemovePodSandbox"], _ = timed(lambda: cri.remove_pod(pod))
    return took


_FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')


def phase_summary(log: str) -> list[str]:
    """Medians of every phase mark per kind of shim command, from containerd's log."""
    groups: dict[str, dict[str, list[float]]] = {}
    for line in log.splitlines():
        if "msg=phases" not in line and "ready_ms=" not in line:
            continue
        fields = dict(_FIELD.findall(line))
        if "ready_ms" in fields:
            # waited_ms: forked before the runc shim started, how long the daemon waited to be handed it;
            # ready_ms: from then (or from its fork, without waited_ms) to serving.
            kind = "pod daemon: handed the runc shim, then serving" if "waited_ms" in fields else \
                "pod daemon: fork to serving"
            marks = {k: fields[k] for k in ("waited_ms", "ready_ms") if k in fields}
        else:
            native = fields.get("client") == "native"
            how = (f"native, handed on ({fields['handed_on']})" if "handed_on" in fields
                   else "native, joined" if "joined" in fields else "native" if native else "Python (worker)")
            kind = f"{fields.get('action', '?')}: {how}"
            skip = {"time", "level", "logger", "msg", "runtime", "action", "id", "client", "handed_on", "boot"}
            marks = {k: v for k, v in fields.items() if k not in skip}
        group = groups.setdefault(kind, {})
        for name, value in marks.items():
            try:
                number = float(value)
            except ValueError:
                continue  # a word (daemon=answers): not a time
            group.setdefault(name, []).append(number)
    out = ["| shim command | n | phases (median ms since it began) |", "| --- | --- | --- |"]
    for kind in sorted(groups):
        marks = groups[kind]
        n = max(len(v) for v in marks.values()) if marks else 0
        text = ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in marks.items())
        out.append(f"| {kind} | {n} | {text} |")
    return out


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containerd", default="2.1", choices=["1.6", "2.1"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--resident", action="store_true", help="start kybernate-shimd for the instance first")
    parser.add_argument("--keep-log", type=Path, help="copy containerd's log (info level) here")
    args = parser.parse_args()

    stack = load_stack()
    work = Path(tempfile.mkdtemp(prefix="bench-cri-"))
    runtime_toml = work / "runtime.toml"
    runtime_toml.write_text((ROOT / "containerd-config" / "runtime.toml").read_text())
    # Without --resident the shim must not find one on the default socket either.
    env = {"KYBERNATE_CONFIG": str(runtime_toml), "KYBERNATE_RESIDENT_SOCKET": "off"}
    resident: subprocess.Popen[bytes] | None = None
    if args.resident:
        sock = work / "shimd.sock"
        env["KYBERNATE_RESIDENT_SOCKET"] = str(sock)
        resident = subprocess.Popen(
            [sys.executable, "-m", "kybernate.shim.resident", "--socket", str(sock)],
            env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not listens(sock):
            if resident.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("kybernate-shimd did not come up")
            time.sleep(0.05)
    c = Containerd(stack, args.containerd, extra_path=[Path(sys.executable).parent],
                   extra_config=snippet(args.containerd, runtime_toml), env=env, log_level="info")
    results: dict[str, dict[str, list[float]]] = {h: {s: [] for s in STEPS} for h in HANDLERS}
    log = ""
    try:
        c.start()
        images.import_image(c, images.busybox_image(work, stack.busybox), namespace=CRI_NAMESPACE)
        images.import_image(c, images.pause_image(work, stack.busybox), namespace=CRI_NAMESPACE)
        with c.cri() as cri:
            for handler in HANDLERS:  # warm caches, page cache and the CNI plugins once per side
                pod_lifecycle(cri, handler, f"warm-{handler}")
            for i in range(args.runs):
                for handler in HANDLERS if i % 2 == 0 else reversed(HANDLERS):
                    for step, seconds in pod_lifecycle(cri, handler, f"b{i}-{handler[0]}").items():
                        results[handler][step].append(seconds)
        log = c.log_text()
        if args.keep_log:
            args.keep_log.write_text(log)
    finally:
        c.stop()
        if resident is not None:
            resident.terminate()
            resident.wait(10)

    version = subprocess.run([str(stack.containerd[args.containerd].containerd), "--version"],
                             capture_output=True, text=True).stdout.split()[2]
    mode = "resident kybernate-shimd" if args.resident else "no resident process"
    print(f"containerd {version}, {args.runs} paired interleaved pod lifecycles, {mode}, medians in ms\n")
    print("| CRI call | runc-v2 | kybernate | kybernate - runc | per-pair difference p25..p75 |")
    print("| --- | --- | --- | --- | --- |")
    for step in STEPS:
        base, ours = results["runc"][step], results["kybernate"][step]
        diffs = [(o - b) * 1000 for o, b in zip(ours, base)]
        lo, hi = quartiles(diffs)
        mb, mo = statistics.median(base) * 1000, statistics.median(ours) * 1000
        print(f"| {step} | {mb:.1f} | {mo:.1f} | {mo - mb:+.1f} | {lo:+.1f} .. {hi:+.1f} |")
    print()
    print("\n".join(phase_summary(log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
