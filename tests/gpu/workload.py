#!/usr/bin/env python3
"""GPU workload for the Kybernate end-to-end runs.

Runs inside the container with the host's python + torch (bind-mounted read-only). It allocates
``--vram-gib`` GiB on the GPU, fills it with seeded random int64 data, takes an exact integer
checksum and then ticks every ``--interval`` seconds: the counter goes up by one and every
``--verify-every`` ticks the checksum is taken again and compared with the first one.

Each tick writes ``counter=<n> checksum=<hex> ok=<bool>`` (then a few ``key=value`` extras) to
stdout, appends it to ``<out-dir>/workload.log`` and replaces ``<out-dir>/status`` atomically. The
files are opened and closed per tick, so the process holds no file open across a CRIU dump.

The checksum is the pair (sum x, sum x*w) over all elements, both taken modulo 2**64 (int64
arithmetic on the GPU wraps; modular addition is order-independent, so the value is exact and
reproducible), with w = (i mod 251) + 1 per chunk position; printed as 32 hex digits.

Nothing here knows about checkpoints: the CUDA driver's checkpoint/restore and CRIU's dump/restore
must be transparent. After a restore the counter simply continues.

``--backend py`` runs without torch (a bytearray in host memory, checksum over its int64 words):
it is only for exercising the containerd/CRIU plumbing on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MASK64 = (1 << 64) - 1
CHUNK_ELEMS = 1 << 24  # 16 Mi int64 = 128 MiB per chunk


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else default


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vram-gib", type=float, default=_env_float("KYB_VRAM_GIB", 2.6),
                   help="GiB to allocate on the GPU (env KYB_VRAM_GIB, default 2.6)")
    p.add_argument("--out-dir", default=os.environ.get("KYB_OUT_DIR", "/out"),
                   help="host-visible directory for status/workload.log (env KYB_OUT_DIR)")
    p.add_argument("--interval", type=float, default=_env_float("KYB_INTERVAL", 0.5))
    p.add_argument("--verify-every", type=int, default=int(_env_float("KYB_VERIFY_EVERY", 1)),
                   help="re-take the checksum every N ticks (default 1: it costs ~1 ms per GiB)")
    p.add_argument("--seed", type=int, default=int(_env_float("KYB_SEED", 1234)))
    p.add_argument("--backend", choices=("torch", "py"), default=os.environ.get("KYB_BACKEND", "torch"))
    p.add_argument("--device", default=os.environ.get("KYB_DEVICE", "cuda:0"))
    p.add_argument("--max-ticks", type=int, default=int(_env_float("KYB_MAX_TICKS", 0)),
                   help="exit after N ticks (0: run until killed)")
    return p.parse_args(argv)


class TorchBuffer:
    def __init__(self, gib: float, seed: int, device: str) -> None:
        import torch  # imported here so that --backend py needs no torch

        self.torch = torch
        self.device = torch.device(device)
        self.n = max(int(gib * (1 << 30)) // 8, 1)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        try:  # full-range random int64 (high is exclusive and must fit in int64)
            self.data = torch.randint(-(1 << 63), (1 << 63) - 1, (self.n,), dtype=torch.int64,
                                      device=self.device, generator=gen)
        except (RuntimeError, OverflowError):  # 63 random bits then
            self.data = torch.empty(self.n, dtype=torch.int64, device=self.device).random_(generator=gen)
        w = min(self.n, CHUNK_ELEMS)
        self.weights = (torch.arange(w, dtype=torch.int64, device=self.device) % 251) + 1
        torch.cuda.synchronize(self.device)

    @property
    def nbytes(self) -> int:
        return self.n * 8

    def checksum(self) -> int:
        torch = self.torch
        s1 = torch.zeros((), dtype=torch.int64, device=self.device)
        s2 = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, self.n, CHUNK_ELEMS):
            chunk = self.data[start:start + CHUNK_ELEMS]
            s1 += chunk.sum()
            s2 += (chunk * self.weights[: chunk.numel()]).sum()
        a, b = int(s1.item()) & MASK64, int(s2.item()) & MASK64
        return (a << 64) | b


class PyBuffer:
    """Host-memory stand-in for machines without a GPU (plumbing tests only)."""

    def __init__(self, gib: float, seed: int, device: str) -> None:
        import random

        n = max(int(gib * (1 << 30)) // 8, 1)
        self.data = bytearray(random.Random(seed).randbytes(n * 8))
        self.n = n

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def checksum(self) -> int:
        words = memoryview(self.data).cast("q")
        a = sum(words) & MASK64
        b = 0
        for i in range(0, self.n, 251):  # cheap second sum for the stand-in
            b = (b + words[i] * (i % 7 + 1)) & MASK64
        return (a << 64) | b


def emit(out_dir: str, line: str) -> None:
    print(line, flush=True)
    if not out_dir:
        return
    try:
        with open(os.path.join(out_dir, "workload.log"), "a") as f:
            f.write(line + "\n")
        tmp = os.path.join(out_dir, ".status.tmp")
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, os.path.join(out_dir, "status"))
    except OSError as e:  # never die because the host dir went away
        print(f"warn: cannot write {out_dir}: {e}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.monotonic()
    cls = TorchBuffer if args.backend == "torch" else PyBuffer
    buf = cls(args.vram_gib, args.seed, args.device)
    t_alloc = time.monotonic() - t0
    ref = buf.checksum()
    emit(args.out_dir, f"ready checksum={ref:032x} bytes={buf.nbytes} backend={args.backend} "
                       f"pid={os.getpid()} alloc_s={t_alloc:.2f} ts={time.time():.3f}")

    counter = 0
    ok = True
    last = ref
    next_tick = time.monotonic() + args.interval
    while args.max_ticks <= 0 or counter < args.max_ticks:
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.monotonic()
        if now - next_tick > args.interval:
            # We were stopped (checkpoint, pause, CRIU): resynchronise, so that the ticks after a
            # restore keep their 0.5 s spacing instead of catching up in a burst.
            next_tick = now
        next_tick += args.interval
        counter += 1
        if args.verify_every > 0 and counter % args.verify_every == 0:
            last = buf.checksum()
            ok = ok and last == ref  # once wrong, stays wrong
        emit(args.out_dir, f"counter={counter} checksum={last:032x} ok={ok} pid={os.getpid()} "
                           f"ts={time.time():.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
