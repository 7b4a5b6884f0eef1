"""Fail when the generated code under proto/ differs from what `make proto` would produce now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
API = PROTO / "kybernate" / "api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def main() -> int:
    sources = sorted(str(p) for p in API.glob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}",
             f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources],
            check=True,
        )
        fresh = Path(out) / "kybernate" / "api"
        want, have = generated(fresh), generated(API)
        stale = sorted(want ^ have)
        stale += sorted(n for n in want & have if not filecmp.cmp(fresh / n, API / n, shallow=False))
    if stale:
        print("generated protobuf code is stale; run `make proto` and commit:", ", ".join(stale))
        return 1
    print(f"proto: {len(want)} generated files current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
