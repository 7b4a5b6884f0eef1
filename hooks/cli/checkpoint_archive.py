"""The `kybernate` command's entry point (the console script names this module): it picks the verb's module and
imports only that one, so that `kybernate checkpoint` into the store (a gRPC call to hookd) does not pay for
containerd's API, the archive writer, the standby client or the registry at process start (docs/store.md).

    kybernate checkpoint CONTAINER [--key K] ...     the store, through hookd        hooks/cli/store_cli.py
    kybernate checkpoint CONTAINER --output X.tar    a CRI-style archive              hooks/cli/archive.py
    kybernate ls|prefetch|restore|store ...          the store                        hooks/cli/store_cli.py
    kybernate park|wake|status ...                   standby                          hooks/cli/standby_cli.py
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import standby_cli, store_cli  # both light until a verb of theirs runs

    if standby_cli.wants_standby(sys.argv[1:] if argv is None else argv):
        return standby_cli.main(sys.argv[1:] if argv is None else argv)
    if store_cli.wants_store(sys.argv[1:] if argv is None else argv):
        return store_cli.main(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kybernate", description="Kybernate node tools")
    verbs = parser.add_subparsers(dest="verb", required=True)
    cp = verbs.add_parser("checkpoint", help="write a CRI-style checkpoint archive of a running container")
    cp.add_argument("container_id", metavar="CONTAINER_ID")
    cp.add_argument("--output", "-o", required=True, help="archive path (written atomically)")
    cp.add_argument("--address", "-a", default="/run/containerd/containerd.sock", help="containerd socket")
    cp.add_argument("--namespace", "-n", default="k8s.io", help="containerd namespace (CRI: k8s.io)")
    cp.add_argument("--timeout", type=float, default=600.0, help="seconds for each containerd call")
    cp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    from .archive import CheckpointError, Progress, checkpoint

    progress = Progress(quiet=args.quiet)
    try:
        path = checkpoint(args.address, args.namespace, args.container_id, args.output,
                          progress=progress, timeout=args.timeout)
    except CheckpointError as err:
        print(f"kybernate checkpoint: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kybernate checkpoint: interrupted", file=sys.stderr)
        return 130
    progress(f"done: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
