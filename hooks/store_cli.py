"""The store's `kybernate` verbs: `checkpoint <container> [--key K] [--leave-running]` into the store.

`kybernate checkpoint --output X.tar` (an archive, hooks/checkpoint_archive.py) stays as it was; without
`--output` the checkpoint goes into the store (hooks/store_checkpoint.py). Progress goes to stderr, one
line per phase; `--json` prints the result as one JSON object on stdout for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import store_layout
from .store_layout import StoreError

DEFAULT_STORE = "/var/lib/kybernate/store"
STORE_ENV = "KYBERNATE_STORE"


def wants_store(argv: list[str]) -> bool:
    """Whether `kybernate <argv>` is one of ours (the archive form of `checkpoint` has --output/-o)."""
    if not argv:
        return False
    if argv[0] == "checkpoint":
        return not any(a in ("--output", "-o") or a.startswith("--output=") for a in argv[1:])
    return False


def default_store() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kybernate", description="Kybernate checkpoint store")
    verbs = parser.add_subparsers(dest="verb", required=True)
    cp = verbs.add_parser("checkpoint", help="checkpoint a running container into the store")
    cp.add_argument("container_id", metavar="CONTAINER_ID")
    cp.add_argument("--key", "-k", help="workload key (default: kybernate.io/checkpoint-key, <pod>.<container>, "
                    "or the container id)")
    cp.add_argument("--leave-running", action="store_true", help="the container runs on after the dump")
    cp.add_argument("--store", default=default_store(), help=f"store root (default ${STORE_ENV} or {DEFAULT_STORE})")
    cp.add_argument("--address", "-a", default="/run/containerd/containerd.sock", help="containerd socket")
    cp.add_argument("--namespace", "-n", default="k8s.io", help="containerd namespace (CRI: k8s.io)")
    cp.add_argument("--timeout", type=float, default=600.0, help="seconds for each call")
    cp.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    cp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    return _checkpoint(args)


def _checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint_archive import Progress
    from .containerd_client import ContainerdClient, ContainerdError
    from .store_checkpoint import StoreCheckpointer

    progress = Progress(quiet=args.quiet)
    address = args.address.removeprefix("unix://")
    if not os.path.exists(address):
        _stderr(f"kybernate checkpoint: error: no containerd socket at {args.address}")
        return 1
    try:
        if args.key is not None:
            store_layout.validate_key(args.key)
        with ContainerdClient(address, args.namespace, timeout=args.timeout) as client:
            result = StoreCheckpointer(client, address, args.container_id, store_layout.Store(args.store),
                                       args.key, leave_running=args.leave_running, progress=progress,
                                       timeout=args.timeout).run()
    except (StoreError, ContainerdError) as err:
        _stderr(f"kybernate checkpoint: error: {err}")
        return 1
    except KeyboardInterrupt:
        _stderr("kybernate checkpoint: interrupted")
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    progress(f"done: {result.generation.key}@{result.generation.number} in {result.seconds:.2f}s")
    return 0
