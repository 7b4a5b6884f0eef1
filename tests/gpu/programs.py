#!/usr/bin/env python3
"""The GPU corpus: real program patterns that Kybernate must checkpoint and restore (issue 13).

    programs.py PROGRAM --out-dir DIR --steps N [--workers-start fork|spawn] [--backend torch|py]

PROGRAM:
  train         an ordinary PyTorch training loop: an MLP (~2 GB of VRAM with AdamW's state), AdamW, a
                cosine LR schedule, a DataLoader with 2 workers (--workers-start fork|spawn; fork is
                torch's default and forks them after CUDA init), pin_memory=True, persistent workers.
  compile       a torch.compile'd (Inductor/Triton) model trained with AdamW.
  graph-decode  greedy decoding of a small transformer from a static KV cache, one CUDA graph replay
                per token.
  hf-generate   a HuggingFace transformers `generate` loop (greedy) on a Llama model initialised at
                random from a config: nothing is downloaded.
  ddp           a data-parallel job of two ranks (issue 17): torch.multiprocessing spawns one process
                per GPU (rank r on cuda:r), NCCL backend (NCCL_NVLS_ENABLE=0 always), rendezvous through
                a file (no TCP store); each step every rank's gradients are all-reduced (summed, then
                averaged) and the loss too; rank 0 writes the lines. The parent never touches CUDA.

Every step appends one line `step=<n> <value>` to DIR/steps.log (opened, appended, closed: no file
stays open across a checkpoint), with the value in full precision (float.hex of the loss, token ids
and the top logit's hex), and rewrites DIR/status (`step=<n>`). Everything is seeded and uses
deterministic algorithms, so two runs give byte-identical steps.log lines: a run that was checkpointed
and restored is compared with an uninterrupted reference, line by line. At step N it writes `done`
and idles (the container stays up until it is removed). Steps are paced (--interval, seconds) so that a
checkpoint taken at a given step finds the program still running.

--backend py: no torch at all (plumbing tests on CPU machines): the same loop shapes in plain Python,
with a multiprocessing pool (fork or spawn) standing in for the DataLoader workers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

PROGRAMS = ("train", "compile", "graph-decode", "hf-generate", "ddp")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("program", choices=PROGRAMS)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.04, help="at least this many seconds per step")
    p.add_argument("--workers-start", choices=("fork", "spawn"), default="fork")
    p.add_argument("--backend", choices=("torch", "py"), default="torch")
    p.add_argument("--hidden", type=int, default=8192, help="train: MLP width (8192: ~2 GB VRAM with AdamW)")
    p.add_argument("--ranks", type=int, default=2, help="ddp: processes (one per GPU)")
    return p.parse_args(argv)


class Log:
    def __init__(self, out_dir: str, interval: float) -> None:
        self.out_dir = out_dir
        self.interval = interval
        self.next_at = time.monotonic()
        os.makedirs(out_dir, exist_ok=True)

    def _status(self, text: str) -> None:
        tmp = os.path.join(self.out_dir, "status.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(self.out_dir, "status"))

    def note(self, text: str) -> None:
        with open(os.path.join(self.out_dir, "program.log"), "a") as f:
            f.write(f"{time.time():.3f} {text}\n")
        print(text, flush=True)

    def step(self, n: int, value: str) -> None:
        with open(os.path.join(self.out_dir, "steps.log"), "a") as f:
            f.write(f"step={n} {value}\n")
        self._status(f"step={n}")
        self.next_at += self.interval
        delay = self.next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            self.next_at = time.monotonic()

    def done(self, n: int) -> None:
        self._status(f"step={n} done")
        self.note("done")
        while True:
            time.sleep(3600)


# ------------------------------------------------------------------------------------------------
# torch programs
# ------------------------------------------------------------------------------------------------
def _deterministic() -> object:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


IN_DIM, OUT_DIM, BATCH = 1024, 256, 256


class Synthetic:
    """Item i is a function of i alone (its own seeded generator): any worker, any order, same data.
    A module-level class so that spawn workers can unpickle it."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[object, object]:
        import torch

        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(IN_DIM, generator=g)
        y = torch.tanh(x[:OUT_DIM] * 0.5 + x[OUT_DIM:2 * OUT_DIM] * 0.25)
        return x, y


def train_torch(args: argparse.Namespace, log: Log) -> None:
    torch = _deterministic()
    import torch.nn as nn  # type: ignore[import-not-found]
    from torch.utils.data import DataLoader  # type: ignore[import-not-found]

    dev = "cuda"
    h = args.hidden
    model = nn.Sequential(nn.Linear(IN_DIM, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, OUT_DIM)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    # CUDA is initialised now (model on the GPU): fork workers are forked from a CUDA process.
    loader = DataLoader(Synthetic(args.steps * BATCH), batch_size=BATCH, shuffle=False, num_workers=2,
                        pin_memory=True, persistent_workers=True, multiprocessing_context=args.workers_start)
    log.note(f"ready train hidden={h} params={sum(p.numel() for p in model.parameters())} "
             f"workers={args.workers_start} vram_mib={torch.cuda.memory_reserved() >> 20}")
    n = 0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.step(n, f"loss={loss.item().hex()} lr={sched.get_last_lr()[0].hex()}")
        n += 1
    log.done(n)


def compile_torch(args: argparse.Namespace, log: Log) -> None:
    torch = _deterministic()
    import torch.nn as nn  # type: ignore[import-not-found]

    dev = "cuda"

    class Block(nn.Module):  # type: ignore[misc]
        def __init__(self, d: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.up = nn.Linear(d, 4 * d)
            self.down = nn.Linear(4 * d, d)

        def forward(self, x: object) -> object:
            return x + self.down(nn.functional.gelu(self.up(self.norm(x))))

    d = 512
    model = nn.Sequential(*[Block(d) for _ in range(4)], nn.LayerNorm(d), nn.Linear(d, d)).to(dev)
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device=dev).manual_seed(7)
    target = torch.randn(d, d, device=dev, generator=g) / math.sqrt(d)
    log.note("ready compile")
    for n in range(args.steps):
        gs = torch.Generator(device=dev).manual_seed(10_000 + n)
        x = torch.randn(128, d, device=dev, generator=gs)
        loss = nn.functional.mse_loss(compiled(x), x @ target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(n, f"loss={loss.item().hex()}")
    log.done(args.steps)


def graph_decode_torch(args: argparse.Namespace, log: Log) -> None:
    torch = _deterministic()
    import torch.nn as nn  # type: ignore[import-not-found]

    dev = "cuda"
    vocab, d, layers, heads, max_len = 4096, 512, 4, 8, 256
    hd = d // heads
    emb = nn.Embedding(vocab, d).to(dev)
    pos_emb = nn.Embedding(max_len, d).to(dev)
    qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(layers)]).to(dev)
    proj = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)]).to(dev)
    mlp = nn.ModuleList([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                         for _ in range(layers)]).to(dev)
    head = nn.Linear(d, vocab).to(dev)
    k_cache = torch.zeros(layers, heads, max_len, hd, device=dev)
    v_cache = torch.zeros(layers, heads, max_len, hd, device=dev)
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    out = torch.zeros(vocab, device=dev)
    arange = torch.arange(max_len, device=dev)

    @torch.no_grad()  # type: ignore[misc]
    def step() -> None:
        x = emb(tok) + pos_emb(pos)  # [1, d]
        mask = (arange <= pos).view(1, 1, max_len)
        here = (arange == pos).view(1, max_len, 1)  # the cache row to write: elementwise, graph-safe, deterministic
        for i in range(layers):
            q, k, v = qkv[i](x).view(3, heads, hd).unbind(0)
            k_cache[i].copy_(torch.where(here, k.view(heads, 1, hd), k_cache[i]))
            v_cache[i].copy_(torch.where(here, v.view(heads, 1, hd), v_cache[i]))
            att = (q.view(heads, 1, hd) @ k_cache[i].transpose(1, 2)) / math.sqrt(hd)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + proj[i]((att @ v_cache[i]).reshape(1, d))
            x = x + mlp[i](x)
        out.copy_(head(x)[0])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph, as capture requires
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    log.note(f"ready graph-decode vram_mib={torch.cuda.memory_reserved() >> 20}")
    k_cache.zero_()
    v_cache.zero_()
    nxt, p = 1, 0
    for n in range(args.steps):
        if p == max_len:  # the cache is full: start a new sequence
            k_cache.zero_()
            v_cache.zero_()
            p = 0
        tok.fill_(nxt)
        pos.fill_(p)
        graph.replay()
        top = out.max()
        nxt = int(out.argmax())
        log.step(n, f"token={nxt} top={top.item().hex()}")
        p += 1
    log.done(args.steps)


def hf_generate_torch(args: argparse.Namespace, log: Log) -> None:
    torch = _deterministic()
    from transformers import LlamaConfig, LlamaForCausalLM  # type: ignore[import-not-found]

    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda").eval()
    log.note("ready hf-generate")
    for n in range(args.steps):
        prompt = torch.tensor([[(n * 31 + i * 7) % cfg.vocab_size for i in range(8)]], device="cuda")
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
        log.step(n, "tokens=" + ",".join(str(t) for t in out[0, prompt.shape[1]:].tolist()))
    log.done(args.steps)


# ------------------------------------------------------------------------------------------------
# plain-python stand-ins (CPU plumbing)
# ------------------------------------------------------------------------------------------------
def _py_batch(i: int) -> list[tuple[float, float]]:
    """Batch i: 32 (x, y) pairs that depend on i alone (a worker computes it)."""
    out = []
    s = (i * 2654435761 + 12345) & 0xFFFFFFFF
    for _ in range(32):
        s = (s * 1103515245 + 12345) & 0x7FFFFFFF
        x = s / 0x7FFFFFFF * 2 - 1
        out.append((x, math.tanh(1.7 * x - 0.3)))
    return out


def train_py(args: argparse.Namespace, log: Log, workers: int) -> None:
    import multiprocessing

    w, b, lr0 = 0.1, 0.0, 0.05
    pool = multiprocessing.get_context(args.workers_start).Pool(workers) if workers else None
    batches = pool.imap(_py_batch, range(args.steps)) if pool else map(_py_batch, range(args.steps))
    log.note(f"ready {args.program} (py) workers={args.workers_start if pool else 'none'}")
    for n, batch in enumerate(batches):
        lr = lr0 * 0.5 * (1 + math.cos(math.pi * n / args.steps))
        gw = gb = loss = 0.0
        for x, y in batch:
            err = math.tanh(w * x + b) - y
            loss += err * err
            d = 2 * err * (1 - math.tanh(w * x + b) ** 2)
            gw, gb = gw + d * x, gb + d
        w, b = w - lr * gw / len(batch), b - lr * gb / len(batch)
        log.step(n, f"loss={(loss / len(batch)).hex()}")
    log.done(args.steps)


def decode_py(args: argparse.Namespace, log: Log) -> None:
    log.note(f"ready {args.program} (py)")
    s = 1
    for n in range(args.steps):
        s = (s * 6364136223846793005 + 1442695040888963407) & ((1 << 64) - 1)
        log.step(n, f"token={s >> 51} top={math.sin(s / 2**64).hex()}")
    log.done(args.steps)


# ------------------------------------------------------------------------------------------------
# ddp: two ranks, one per GPU, NCCL all-reduce every step
# ------------------------------------------------------------------------------------------------
DDP_IN, DDP_HIDDEN, DDP_BATCH = 512, 2048, 128


def ddp_rank(rank: int, args: argparse.Namespace, rendezvous: str) -> None:
    """One rank: cuda:<rank>, the same seeded model on every rank, its own seeded batches."""
    torch = _deterministic()
    import torch.distributed as dist  # type: ignore[import-not-found]
    import torch.nn as nn  # type: ignore[import-not-found]

    # Both ranks sleep the same fixed interval right after the step's last collective returned: between
    # steps neither has work queued on its GPU, so a lock of both (a pause, a checkpoint) does not find one
    # rank inside a collective that waits for the other, already locked, rank.
    log = Log(args.out_dir, 0.0) if rank == 0 else None
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=args.ranks)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DDP_IN, DDP_HIDDEN), nn.GELU(), nn.Linear(DDP_HIDDEN, 64)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    warm = torch.ones(1, device=dev)
    dist.all_reduce(warm)  # NCCL's communicator is set up here, before the first step
    if log is not None:
        nccl = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
        log.note(f"ready ddp ranks={args.ranks} nccl={nccl} vram_mib={torch.cuda.memory_reserved(dev) >> 20}")
    for n in range(args.steps):
        g = torch.Generator().manual_seed(7919 * n + rank)
        x = torch.randn(DDP_BATCH, DDP_IN, generator=g).to(dev)
        y = torch.tanh(x[:, :64] * 0.5 + x[:, 64:128] * 0.25)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(args.ranks)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        value = (total / args.ranks).item()  # every rank waits here for the step's collectives
        if log is not None:
            log.step(n, f"loss={value.hex()}")
        time.sleep(args.interval)
    dist.barrier()
    if log is not None:
        log.done(args.steps)  # idles; the other ranks idle too (the job stays up until it is removed)
    while True:
        time.sleep(3600)


def ddp_torch(args: argparse.Namespace, log: Log) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off (the device machines require it)
    import torch.multiprocessing as mp  # type: ignore[import-not-found]

    rendezvous = os.path.join(args.out_dir, f"rendezvous-{os.getpid()}")
    if os.path.exists(rendezvous):
        os.unlink(rendezvous)
    log.note(f"spawning {args.ranks} ranks")
    mp.spawn(ddp_rank, args=(args, rendezvous), nprocs=args.ranks, join=True)


def _ddp_py_rank(rank: int, args: argparse.Namespace, conn: object) -> None:
    """The py stand-in of one rank: its own batch, the 'all-reduce' through the parent's pipes."""
    log = Log(args.out_dir, 0.0) if rank == 0 else None
    w, b = 0.1, 0.0
    for n in range(args.steps):
        batch = _py_batch(2 * n + rank)
        gw = gb = loss = 0.0
        for x, y in batch:
            err = math.tanh(w * x + b) - y
            loss += err * err
            d = 2 * err * (1 - math.tanh(w * x + b) ** 2)
            gw, gb = gw + d * x, gb + d
        conn.send((gw / len(batch), gb / len(batch), loss / len(batch)))  # type: ignore[attr-defined]
        gw, gb, mean = conn.recv()  # type: ignore[attr-defined]
        w, b = w - 0.05 * gw, b - 0.05 * gb
        if log is not None:
            log.step(n, f"loss={mean.hex()}")
        time.sleep(args.interval)
    if log is not None:
        log.done(args.steps)
    while True:
        time.sleep(3600)


def ddp_py(args: argparse.Namespace, log: Log) -> None:
    """Two ranks as two processes (spawned, as torch.multiprocessing does), the parent summing their
    gradients every step: the plumbing of the torch job without torch or a GPU."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(args.ranks)]
    procs = [ctx.Process(target=_ddp_py_rank, args=(r, args, pipes[r][1]), daemon=True) for r in range(args.ranks)]
    fake = [g for g in os.environ.get("KYB_FAKE_GPUS", "").split(",") if g]
    if fake:  # started now, so that it does not inherit a rank's fake identity below
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    for r, p in enumerate(procs):
        if fake:  # CPU rehearsal: each rank a fake CUDA process of the fake driver, rank r on GPU r
            os.environ.update(FAKEGPU_PROC=f"{os.environ.get('KYB_FAKE_PROC', 'ddp')}-r{r}",
                              FAKEGPU_GPU=fake[r % len(fake)], FAKEGPU_VRAM=str(1 << 28))
        p.start()
    log.note(f"ready ddp (py) ranks={args.ranks}")
    for _ in range(args.steps):
        parts = [pipes[r][0].recv() for r in range(args.ranks)]
        mean = tuple(sum(v[i] for v in parts) / args.ranks for i in range(3))
        for r in range(args.ranks):
            pipes[r][0].send(mean)
    for p in procs:
        p.join()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log = Log(args.out_dir, args.interval)
    if args.program == "ddp":
        (ddp_py if args.backend == "py" else ddp_torch)(args, log)
        return 0
    if args.backend == "py":
        if args.program == "train":
            train_py(args, log, workers=2)
        elif args.program == "compile":
            train_py(args, log, workers=0)
        else:
            decode_py(args, log)
        return 0
    {"train": train_torch, "compile": compile_torch, "graph-decode": graph_decode_torch,
     "hf-generate": hf_generate_torch}[args.program](args, log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
