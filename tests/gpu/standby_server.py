#!/usr/bin/env python3
"""A GPU "model server" for the standby scenario (tests/gpu/standby_scenario.py).

Runs inside the container with the host's python + torch. It fills ``--vram-gib`` GiB of VRAM with seeded
random int64 (workload.py's TorchBuffer), takes the exact checksum once, then serves HTTP on ``--port``:
every GET takes the checksum again on the GPU (it reads all of its VRAM, so the first byte of an answer after
a wake comes only once the GPU state is back) and answers ``<checksum hex> <ok>``. Writes ``ready <checksum>``
to ``<out-dir>/status`` when it listens.
"""

from __future__ import annotations

import argparse
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import PyBuffer, TorchBuffer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vram-gib", type=float, default=2.6)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out-dir", default="/out")
    p.add_argument("--backend", choices=("torch", "py"), default="torch")
    a = p.parse_args()
    buf = (TorchBuffer if a.backend == "torch" else PyBuffer)(a.vram_gib, a.seed, "cuda:0")
    reference = f"{buf.checksum():032x}"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            now = f"{buf.checksum():032x}"
            body = f"{now} {now == reference}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("0.0.0.0", a.port), Handler)
    tmp = os.path.join(a.out_dir, ".status.tmp")
    with open(tmp, "w") as f:
        f.write(f"ready {reference}\n")
    os.replace(tmp, os.path.join(a.out_dir, "status"))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
