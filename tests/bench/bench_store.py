"""`kybernate checkpoint` into the store vs `ctr c checkpoint` vs the raw floor, on the same container.

One container under the kybernate runtime holds --mib MiB of memory. Per round, interleaved (rotating the
order so drift hits all alike), each leaving the task running:
- `kybernate checkpoint --leave-running` into a store on --dir: pause, our shim's dump into the store,
  rootfs diff, resume, sha256 + manifest (its phases are printed too);
- `ctr c checkpoint --task --rw`: containerd's own path (dump into a temp dir, copy into the content store);
- the floor: `runc checkpoint --leave-running --image-path` on the same container, i.e. CRIU alone;
- the disk: writing the same number of bytes with dd (conv=fsync off: CRIU does not fsync either).
On a GPU machine the same script measures GPU containers when --gpu-image is given (tests/gpu).

With --s3, the S3 tier instead (no containerd): against one S3-compatible server started for the run
(`rclone serve s3`, tests/harness/s3server.py), interleaved per round, a --mib MiB generation:
- the store's upload (S3Tier.upload: parallel files and parts, per-part SHA256, manifest last) and its
  download into a fresh store (including the sha256 check of every part);
- the plain copy of the same client library: boto3's upload_file/download_file, default settings;
- the other client measured: minio's fput_object/fget_object (parts of 64 MiB, 8 parallel uploads).

Usage: python tests/bench/bench_store.py [--containerd 1.6|2.1] [--runs 5] [--mib 512] [--dir /var/tmp]
       python tests/bench/bench_store.py --s3 [--runs 3] [--mib 256] [--dir /var/tmp]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

if TYPE_CHECKING:
    from harness.containerd import Containerd

KYBERNATE = "io.containerd.kybernate.v1"
NAME = "bench"


def holder(mib: int) -> str:
    # awk doubles a string of 'a's (not zero pages, which CRIU would skip) to `mib` MiB, then waits in
    # system("sleep"), holding it. (busybox sh frees a large variable's pages right away.)
    return (f"awk 'BEGIN {{ s = \"a\"; while (length(s) < {mib << 20}) s = s s; "
            f"system(\"echo ready > /ready; sleep 100000\") }}'")


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def kybernate_checkpoint(c: Containerd, hookd_socket: str) -> tuple[float, dict[str, float], int]:
    """The whole `kybernate checkpoint` command, through hookd's Store.Checkpoint (hookd owns the store)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", NAME, "--leave-running",
         "--key", "bench", "--socket", hookd_socket, "--namespace", c.namespace,
         "--json", "--quiet"], capture_output=True, text=True, check=True)
    took = time.perf_counter() - started
    result = json.loads(done.stdout)
    shutil.rmtree(result["path"])
    return took, result["phases"], int(result["size"])


def ctr_checkpoint(c: Containerd, i: int) -> float:
    ref = f"bench/ckpt:{i}"
    started = time.perf_counter()
    c.ctr("containers", "checkpoint", "--task", "--rw", NAME, ref)
    took = time.perf_counter() - started
    c.ctr("images", "rm", "--sync", ref, check=False)
    return took


def raw_checkpoint(c: Containerd, runc: str, scratch: Path) -> tuple[float, int]:
    images_dir, work = scratch / "raw", scratch / "raw-work"
    started = time.perf_counter()
    subprocess.run([runc, "--root", f"/run/containerd/runc/{c.namespace}", "checkpoint", "--leave-running",
                    "--image-path", str(images_dir), "--work-path", str(work), NAME],
                   check=True, env=c.env, capture_output=True)
    took = time.perf_counter() - started
    size = tree_size(images_dir)
    shutil.rmtree(images_dir)
    shutil.rmtree(work, ignore_errors=True)
    return took, size


def disk_write(scratch: Path, size: int) -> float:
    target = scratch / "dd"
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={max(1, size >> 22)}"],
                   check=True, capture_output=True)
    took = time.perf_counter() - started
    target.unlink()
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containerd", default="1.6", choices=["1.6", "2.1"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=512, help="memory the container holds")
    parser.add_argument("--dir", default="/var/tmp", help="where the store and the raw dumps go (same disk)")
    parser.add_argument("--s3", action="store_true", help="measure the S3 tier and its clients instead")
    parser.add_argument("--real-driver", action="store_true",
                        help="start the run's kybernate-hookd on the node's CUDA driver (GPU machine); default: on "
                        "the fake GPU driver (tests/fakes/fakegpu)")
    parser.add_argument("--s3-part-concurrency", default="",
                        help="with --s3: more store rows, one per value (parts in flight per file), e.g. 16,32")
    parser.add_argument("--json", dest="json_out", default="", help="with --s3: also write every number to this file")
    args = parser.parse_args()
    if args.s3:
        sweep = [int(n) for n in args.s3_part_concurrency.split(",") if n]
        return s3_bench(args.runs, args.mib, Path(args.dir), args.json_out, sweep)

    # The containerd benchmark's harness (grpc, the stack) is imported only here: --s3 runs where only
    # boto3 and the server are installed (tests/gpu/on_gpu.sh --scenario s3).
    from harness import images
    from harness.containerd import Containerd
    from harness.stack import load_stack

    stack = load_stack()
    runc = str(stack.runc)
    c = Containerd(stack, args.containerd, extra_path=[Path(sys.executable).parent], log_level="info")
    ours: list[float] = []
    phases: dict[str, list[float]] = {}
    ctr_s: list[float] = []
    raw_s: list[float] = []
    disk_s: list[float] = []
    size = 0
    scratch = Path(tempfile.mkdtemp(prefix="kyb-bench-", dir=args.dir))
    hookd = None
    try:
        c.start()
        with tempfile.TemporaryDirectory() as d:
            images.import_image(c, images.busybox_image(Path(d), stack.busybox))
        c.ctr("run", "-d", "--runtime", KYBERNATE, images.BUSYBOX_IMAGE, NAME, "sh", "-c", holder(args.mib))
        deadline = time.monotonic() + 300
        while c.ctr("tasks", "exec", "--exec-id", "probe", NAME, "cat", "/ready", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark container never filled its memory")
            time.sleep(0.5)
        # The run's own hookd owns the store on --dir and talks to this run's containerd.
        from harness.gpunode import GpuNode

        home = scratch / "hookd"
        home.mkdir()
        flags = ["--containerd-address", str(c.address), "--store-root", str(scratch / "store"),
                 "--store-registry", str(scratch / "registry.db")]
        hookd = GpuNode(home, hookd_args=flags)
        if args.real_driver:  # the same flags, the node's libcuda and NVML instead of the fake's
            hookd.hookd_args = [*flags, "--libcuda", "libcuda.so.1", "--libnvml", ""]
            hookd.restart_hookd()
        socket = hookd.socket
        kybernate_checkpoint(c, socket)  # warm-up: page cache, CRIU binary, imports
        for i in range(args.runs):
            steps = ["kyb", "ctr", "raw"]
            for step in steps[i % 3:] + steps[:i % 3]:
                if step == "kyb":
                    took, ph, size = kybernate_checkpoint(c, socket)
                    ours.append(took)
                    for k, v in ph.items():
                        phases.setdefault(k, []).append(v)
                elif step == "ctr":
                    ctr_s.append(ctr_checkpoint(c, i))
                else:
                    took, _ = raw_checkpoint(c, runc, scratch)
                    raw_s.append(took)
            disk_s.append(disk_write(scratch, size))
    finally:
        if hookd is not None:
            hookd.stop()
        c.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    med = statistics.median
    mib = size / (1 << 20)
    version = subprocess.run([str(stack.containerd[args.containerd].containerd), "--version"],
                             capture_output=True, text=True).stdout.split()[2]
    print(f"containerd {version}, CPU container holding {args.mib} MiB, checkpoint {mib:.0f} MiB, "
          f"{args.runs} interleaved rounds, medians, store on {args.dir}\n")
    print("| path | seconds | MB/s of checkpoint | × raw CRIU |")
    print("| --- | --- | --- | --- |")
    floor = med(raw_s)
    for label, values in (("`kybernate checkpoint --leave-running` (whole command)", ours),
                          ("`ctr c checkpoint --task --rw`", ctr_s),
                          ("raw floor: `runc checkpoint --leave-running` (CRIU dump)", raw_s),
                          ("disk: `dd` of the same size", disk_s)):
        m = med(values)
        print(f"| {label} | {m:.3f} | {size / m / 1e6:.0f} | {m / floor:.2f} |")
    print("\n| `kybernate checkpoint` phase | seconds |")
    print("| --- | --- |")
    for k, v in phases.items():
        print(f"| {k} | {med(v):.3f} |")
    return 0


def s3_bench(runs: int, mib: int, where: Path, json_out: str, sweep: list[int]) -> int:
    import os

    from harness.s3server import S3Server

    from kybernate.hooks.api import store as store_layout
    from kybernate.hooks.api.store_s3 import S3Config, S3Tier

    try:  # the second client measured; optional (the GPU machine's carry holds boto3 only)
        from minio import Minio
    except ImportError:
        Minio = None  # noqa: N806

    scratch = Path(tempfile.mkdtemp(prefix="kyb-s3bench-", dir=where))
    kind = "rclone"  # the server's name in the report
    server = S3Server(scratch, request_log=False).start()  # no debug log: GBs of reads would flood it
    results: dict[str, list[float]] = {}
    steps: list[tuple[str, Callable[[], object]]] = []
    size = 0
    try:
        os.environ.update(server.env("bench"))
        config = S3Config.from_env()
        assert config is not None
        tier = S3Tier(config)
        store = store_layout.Store(str(scratch / "store"))
        pending = store.begin("bench")
        os.makedirs(os.path.join(pending.temp, "checkpoint"))
        with open(os.path.join(pending.temp, "checkpoint", "pages-1.img"), "wb") as f:
            for i in range(0, mib, 64):  # incompressible, no two parts equal
                f.write(os.urandom(min(64, mib - i) << 20))
        generation = pending.commit(store_layout.Identity("bench"))
        pages = os.path.join(generation.path, "checkpoint", "pages-1.img")
        size = generation.manifest.size
        print(f"{mib} MiB generation written; {kind} serving on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)
        plain = server.client()

        def timed(label: str, step: Callable[[], object]) -> None:
            started = time.perf_counter()
            step()
            took = time.perf_counter() - started
            results.setdefault(label, []).append(took)
            print(f"  {label}: {took:.3f} s, {size / took / 1e6:.0f} MB/s", file=sys.stderr, flush=True)

        def store_download(tier: S3Tier = tier) -> None:
            fresh = store_layout.Store(str(scratch / "fresh"))
            tier.download(fresh, "bench")
            shutil.rmtree(scratch / "fresh")

        def plain_download() -> None:
            plain.download_file(server.bucket, "plain/pages", str(scratch / "p"))
            os.unlink(scratch / "p")

        steps = [
            ("store upload (S3Tier.upload)", lambda: tier.upload(generation)),
            ("store download + verify (S3Tier.download)", store_download),
            ("boto3 plain upload_file", lambda: plain.upload_file(pages, server.bucket, "plain/pages")),
            ("boto3 plain download_file", plain_download),
        ]
        for n in sweep:  # the same transfers with more (or fewer) parts in flight per file
            tuned = S3Tier(config, part_concurrency=n)
            steps += [(f"store upload, {n} parts in flight", lambda t=tuned: t.upload(generation)),
                      (f"store download + verify, {n} parts in flight", lambda t=tuned: store_download(t))]
        if Minio is not None:
            other = Minio(f"127.0.0.1:{server.port}", access_key=server.access_key, secret_key=server.secret_key,
                          secure=False, region="us-east-1")

            def minio_get() -> None:
                other.fget_object(server.bucket, "minio/pages", str(scratch / "m"))
                os.unlink(scratch / "m")

            steps += [
                ("minio fput_object", lambda: other.fput_object(server.bucket, "minio/pages", pages,
                                                                part_size=64 << 20, num_parallel_uploads=8)),
                ("minio fget_object", minio_get),
            ]
        timed("warm-up", lambda: tier.upload(generation))
        for i in range(runs):  # rotate the order so drift (page cache, server state) hits every step alike
            for label, step in steps[i % len(steps):] + steps[:i % len(steps)]:
                timed(label, step)
            s3_report(results, [label for label, _ in steps], size, runs, where, kind, json_out, final=False)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return s3_report(results, [label for label, _ in steps], size, runs, where, kind, json_out, final=True)


def s3_report(results: dict[str, list[float]], labels: list[str], size: int, runs: int, where: Path, kind: str,
              json_out: str, final: bool) -> int:
    """The table (final) and the JSON (after every round too, so a run cut short keeps what it measured)."""
    import os

    from kybernate.hooks.api import store as store_layout
    from kybernate.hooks.api import store_s3

    done = [label for label in labels if results.get(label)]
    med = {label: statistics.median(results[label]) for label in done}
    settings = (f"store: {store_s3.FILE_CONCURRENCY} files x {store_s3.PART_CONCURRENCY} parts in flight, "
                f"{store_layout.PART_SIZE >> 20} MiB parts")
    pairs = {"upload": ("boto3 plain upload_file", "store upload (S3Tier.upload)"),
             "download": ("boto3 plain download_file", "store download + verify (S3Tier.download)")}
    ratios = {k: med[plain] / med[ours] for k, (plain, ours) in pairs.items() if plain in med and ours in med}
    if json_out:
        Path(json_out).write_text(json.dumps({
            "server": kind, "bytes": size, "runs": runs, "rounds_done": min((len(results[x]) for x in done), default=0),
            "cpus": os.cpu_count(), "scratch": str(where), "settings": settings, "seconds": results,
            "median_s": med, "mb_s": {k: size / v / 1e6 for k, v in med.items()}, "store_vs_plain": ratios}, indent=1))
    if not final:
        return 0
    print(f"\nS3 tier: {size / (1 << 20):.0f} MiB generation, {runs} rounds, medians, one server "
          f"({kind} on 127.0.0.1), scratch on {where}, {os.cpu_count()} CPUs; {settings}\n")
    print("| step | seconds | MB/s |")
    print("| --- | --- | --- |")
    for label in done:
        print(f"| {label} | {med[label]:.3f} | {size / med[label] / 1e6:.0f} |")
    print("\nstore / plain boto3 throughput: " + ", ".join(
        f"{k} {v:.0%} ({'met' if v >= 0.8 else 'MISSED'}: target 80 %)" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
