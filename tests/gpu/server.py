#!/usr/bin/env python3
"""An inference-style server for the `resilience` scenario: weights loaded from a file on disk, warmed
up, then answering HTTP requests. What matters is the time from `ctr run` to the first answer: cold
(load + upload to the GPU + warm-up) against restored from a store checkpoint (docs/resilience.md).

    server.py make-weights --weights FILE --mib N [--backend torch|py]
    server.py serve --weights FILE --port P --out-dir DIR [--backend torch|py] [--warmup N]

`serve` answers GET /infer?seed=K with one line: the deterministic output of the model for the input
made from seed K (hex of the top logit and its index), the same bytes every time for the same weights,
so a restored server's answer is compared with the cold one's. GET /health answers "ok". The phases
(start, weights loaded, on the GPU, warmed up, listening) go to DIR/server.log with their times.

--backend py: no torch (plumbing tests on CPU machines): the weights are float32 values read with the
array module and the "model" is a few matrix-vector products in plain Python.
"""

from __future__ import annotations

import argparse
import array
import http.server
import os
import random
import struct
import sys
import time
import urllib.parse

WIDTH = 4096  # torch: the model's width; layers = weights / (WIDTH * WIDTH * 2 bytes)
PY_WIDTH = 64


def note(out_dir: str, text: str) -> None:
    with open(os.path.join(out_dir, "server.log"), "a") as f:
        f.write(f"{time.time():.3f} {text}\n")
    print(text, flush=True)


# ---- torch ----------------------------------------------------------------------------------------
def make_weights_torch(path: str, mib: int) -> None:
    import torch

    layers = max(1, (mib << 20) // (WIDTH * WIDTH * 2))
    g = torch.Generator().manual_seed(1234)
    state = {f"layer{i}": (torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5).to(torch.float16)
             for i in range(layers)}
    torch.save(state, path)


class TorchModel:
    def __init__(self, path: str, out_dir: str) -> None:
        import torch

        self.torch = torch
        torch.use_deterministic_algorithms(True)
        state = torch.load(path, map_location="cpu")
        note(out_dir, f"weights loaded: {len(state)} layers from {path}")
        self.layers = [state[f"layer{i}"].cuda() for i in range(len(state))]
        torch.cuda.synchronize()
        note(out_dir, "weights on the GPU")

    def infer(self, seed: int) -> str:
        torch = self.torch
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(8, WIDTH, generator=g, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            for w in self.layers:
                x = torch.nn.functional.gelu(x @ w)
        top = x.float().sum(dim=0)
        value, index = top.max(dim=0)
        return f"{float(value).hex()} {int(index)}"


# ---- plain python -----------------------------------------------------------------------------------
def make_weights_py(path: str, mib: int) -> None:
    rng = random.Random(1234)
    count = max(PY_WIDTH * PY_WIDTH, (mib << 20) // 4)
    with open(path, "wb") as f:
        for _ in range(0, count, 4096):
            f.write(struct.pack("4096f", *(rng.uniform(-1, 1) / PY_WIDTH ** 0.5 for _ in range(4096))))


class PyModel:
    def __init__(self, path: str, out_dir: str) -> None:
        values = array.array("f")
        with open(path, "rb") as f:
            values.frombytes(f.read())
        note(out_dir, f"weights loaded: {len(values)} values from {path}")
        per = PY_WIDTH * PY_WIDTH
        self.layers = [values[i:i + per] for i in range(0, min(len(values), 4 * per) - per + 1, per)]

    def infer(self, seed: int) -> str:
        rng = random.Random(seed)
        x = [rng.uniform(-1, 1) for _ in range(PY_WIDTH)]
        for w in self.layers:
            x = [max(0.0, sum(w[r * PY_WIDTH + c] * x[c] for c in range(PY_WIDTH))) for r in range(PY_WIDTH)]
        index = max(range(PY_WIDTH), key=lambda i: x[i])
        return f"{float(x[index]).hex()} {index}"


# ---- serving ----------------------------------------------------------------------------------------
def serve(a: argparse.Namespace) -> int:
    os.makedirs(a.out_dir, exist_ok=True)
    note(a.out_dir, f"start pid={os.getpid()}")
    model = TorchModel(a.weights, a.out_dir) if a.backend == "torch" else PyModel(a.weights, a.out_dir)
    for i in range(a.warmup):
        model.infer(10_000 + i)
    note(a.out_dir, f"warmed up ({a.warmup} requests)")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urllib.parse.urlparse(self.path)
            if url.path == "/health":
                body = "ok"
            elif url.path == "/infer":
                seed = int(urllib.parse.parse_qs(url.query).get("seed", ["0"])[0])
                body = model.infer(seed)
            else:
                self.send_error(404)
                return
            data = (body + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    http.server.HTTPServer.allow_reuse_address = True
    server = http.server.HTTPServer(("127.0.0.1", a.port), Handler)
    note(a.out_dir, f"listening on 127.0.0.1:{a.port}")
    server.serve_forever()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("make-weights", "serve"))
    p.add_argument("--weights", required=True)
    p.add_argument("--mib", type=int, default=2048, help="make-weights: size of the weights file")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--out-dir", default=".")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--backend", choices=("torch", "py"), default="torch")
    a = p.parse_args(argv)
    if a.command == "make-weights":
        (make_weights_torch if a.backend == "torch" else make_weights_py)(a.weights, a.mib)
        return 0
    return serve(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
