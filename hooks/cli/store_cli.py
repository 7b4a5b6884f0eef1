"""The store's `kybernate` verbs: `checkpoint <container> --key K [--leave-running]` (a client of hookd's
Store.Checkpoint), `ls [--json]` (the registry), `prefetch KEY[@GEN]` (from S3), `restore KEY[@GEN] --id NEW`
(for ctr users), `store rebuild` (the registry from the manifests, local and in S3), `store export` (a
CRI-style archive), `store gc` (retention and the local budget, which hookd also runs after every checkpoint).

`kybernate checkpoint --output X.tar` (an archive, hooks/cli/checkpoint_archive.py) stays as it was; without
`--output` the checkpoint goes into the store, run by kybernate-hookd (hooks/hookd/store/). Progress goes to
stderr (hooks/cli/progress.py); `--json` prints the result as one JSON object on stdout for scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from kybernate.hooks.api import DEFAULT_SOCKET
from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api.store import StoreError

HOOKD_SOCKET_ENV = "KYBERNATE_HOOKD_SOCKET"
KYBERNATE_RUNTIME = "io.containerd.kybernate.v1"
RESTORE_ANNOTATION = "kybernate.io/restore-from"

DEFAULT_STORE = "/var/lib/kybernate/store"
STORE_ENV = "KYBERNATE_STORE"


def wants_store(argv: list[str]) -> bool:
    """Whether `kybernate <argv>` is one of ours (the archive form of `checkpoint` has --output/-o)."""
    if not argv:
        return False
    if argv[0] == "checkpoint":
        return not any(a in ("--output", "-o") or a.startswith("--output=") for a in argv[1:])
    return argv[0] in ("ls", "store", "prefetch", "restore")


KEEP_ENV = "KYBERNATE_KEEP"
BUDGET_ENV = "KYBERNATE_BUDGET"


def default_store() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def _size(text: str) -> int:
    """`500M`, `20G`, `1T` or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K, M, G, T)") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=default_store(), help=f"store root (default ${STORE_ENV} or {DEFAULT_STORE})")
    # The default is resolved after parsing (main), by the verbs that use it: `kybernate checkpoint` builds this
    # parser too and should not import the registry (sqlite3) at its start.
    p.add_argument("--registry", default=None, help="the SQLite index (default $KYBERNATE_REGISTRY "
                   "or /var/lib/kybernate/registry.db)")


def _retention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=int, default=int(os.environ.get(KEEP_ENV) or 3),
                   help=f"generations kept per key (default ${KEEP_ENV} or 3)")
    p.add_argument("--budget", type=_size, default=_size(os.environ[BUDGET_ENV]) if os.environ.get(BUDGET_ENV)
                   else None, help=f"local disk budget of the store, e.g. 500G (default ${BUDGET_ENV}, none)")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kybernate", description="Kybernate checkpoint store")
    verbs = parser.add_subparsers(dest="verb", required=True)
    cp = verbs.add_parser("checkpoint", help="checkpoint a running container into the store")
    cp.add_argument("container_id", metavar="CONTAINER_ID")
    cp.add_argument("--key", "-k", help="workload key (default: the container's kybernate.io/checkpoint-key, else "
                    "<pod namespace>_<pod>_<container> for CRI containers, <namespace>_<id> otherwise)")
    cp.add_argument("--leave-running", action="store_true", help="the container runs on after the dump")
    cp.add_argument("--socket", default=os.environ.get(HOOKD_SOCKET_ENV) or DEFAULT_SOCKET,
                    help=f"kybernate-hookd's socket (${HOOKD_SOCKET_ENV}, default {DEFAULT_SOCKET}): hookd runs the "
                    "checkpoint into its store, indexes it and uploads it when its S3 tier is configured")
    cp.add_argument("--namespace", "-n", default="k8s.io", help="containerd namespace (CRI: k8s.io)")
    cp.add_argument("--timeout", type=float, default=600.0,
                    help="deadline of the whole checkpoint in seconds: past it hookd rolls it back")
    cp.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    cp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    pf = verbs.add_parser("prefetch", help="download a checkpoint from the S3 tier into the local store")
    pf.add_argument("reference", metavar="KEY[@GENERATION]")
    _common(pf)
    pf.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    pf.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    rs = verbs.add_parser("restore", help="start a new container restored from the store (for ctr users; pods use "
                          "the kybernate.io/restore-from annotation)")
    rs.add_argument("reference", metavar="KEY[@GENERATION]")
    rs.add_argument("--id", required=True, dest="new_id", help="the new container's id")
    rs.add_argument("--image", help="its image (default: the checkpointed container's, from the manifest)")
    rs.add_argument("--address", "-a", default="/run/containerd/containerd.sock", help="containerd socket")
    rs.add_argument("--namespace", "-n", default="default", help="containerd namespace (ctr's: default)")
    rs.add_argument("--runtime", default=KYBERNATE_RUNTIME, help=f"the runtime [{KYBERNATE_RUNTIME}]")
    rs.add_argument("--ctr", default="ctr", help="the ctr binary that creates and starts it [ctr on PATH]")
    _common(rs)
    ls = verbs.add_parser("ls", help="list the checkpoints the registry knows")
    _common(ls)
    ls.add_argument("--json", action="store_true", help="one JSON array on stdout")
    ls.add_argument("key", nargs="?", help="only this key")
    store = verbs.add_parser("store", help="registry and space")
    actions = store.add_subparsers(dest="action", required=True)
    rebuild = actions.add_parser("rebuild", help="rebuild the registry from the manifests in the store")
    _common(rebuild)
    export = actions.add_parser("export", help="a generation as a CRI-style checkpoint archive (checkpointctl "
                                "reads it; kybernate.io/restore-from: <archive> restores it)")
    export.add_argument("reference", metavar="KEY[@GENERATION]")
    export.add_argument("--output", "-o", required=True, help="the archive to write (.tar)")
    _common(export)
    gc = actions.add_parser("gc", help="apply retention (locally, and in S3 when configured) and the local budget now")
    _common(gc)
    _retention(gc)
    args = parser.parse_args(argv)
    if getattr(args, "registry", "") is None:
        from kybernate.hooks.api.store_registry import default_registry

        args.registry = default_registry()
    try:
        if args.verb == "checkpoint":
            return _checkpoint(args)
        if args.verb == "ls":
            return _ls(args)
        if args.verb == "prefetch":
            return _prefetch(args)
        if args.verb == "restore":
            return _restore(args)
        if args.action == "rebuild":
            return _rebuild(args)
        if args.action == "export":
            return _export(args)
        return _gc(args)
    except StoreError as err:
        _stderr(f"kybernate {args.verb}: error: {err}")
        return 1


def _ls(args: argparse.Namespace) -> int:
    from kybernate.hooks.api.store_registry import Registry

    rows = Registry(args.registry).rows(args.key)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], sort_keys=True))
        return 0
    table = [("KEY", "GEN", "STATE", "TIERS", "SIZE", "CREATED", "NODE", "GPU")]
    for r in rows:
        gpu = f"{r.gpu.get('processes', 0)} proc, {store_layout.human(int(r.gpu.get('vram_bytes', 0)))}" \
            if r.gpu.get("processes") else "-"
        state = r.state if r.state != "uploading" or not r.size else \
            f"uploading {100 * r.uploaded_bytes // max(1, r.size)}%"
        if r.error:
            state += f" ({r.error}; {r.attempts} attempt{'s' if r.attempts != 1 else ''}, hookd retries)" \
                if r.state == "failed" and r.attempts else f" ({r.error})"
        table.append((r.key, str(r.generation), state, r.tiers, store_layout.human(r.size), r.created[:19] + "Z",
                      r.node, gpu))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from kybernate.hooks.api.store_registry import Registry
    from kybernate.hooks.api.store_s3 import S3Tier

    tier = _s3()
    remote = tier.manifests() if isinstance(tier, S3Tier) else None
    registry = Registry(args.registry)
    count = registry.rebuild(store_layout.Store(args.store), remote)
    where = args.store + (f" and {tier.config.where}" if isinstance(tier, S3Tier) else "")
    queued = len(registry.pending_uploads())
    _stderr(f"kybernate store rebuild: {count} generations indexed from {where}"
            + (f"; {queued} local ones S3 lacks are queued for upload (kybernate-hookd uploads them)"
               if queued else ""))
    return 0


def _restore(args: argparse.Namespace) -> int:
    """`ctr run` of the checkpointed image under our runtime, annotated `kybernate.io/restore-from:
    store:KEY@GEN`, with the checkpointed process's argv, env and cwd (from spec.dump): our shim's Create
    verifies and restores the generation (downloading it first when only S3 has it), as for a pod."""
    import subprocess

    from kybernate.hooks.api.store_s3 import S3Tier

    key, number = store_layout.parse_reference(args.reference.removeprefix("store:"))
    store = store_layout.Store(args.store)
    try:
        generation = store.open(key, number)
    except store_layout.NotFound:
        tier = _s3()
        if not isinstance(tier, S3Tier):
            raise
        _stderr(f"{key}{'@' + str(number) if number else ''} is not in the local store: downloading it from "
                f"{tier.config.where}")
        generation = tier.download(store, key, number)
    if number is None:  # the newest complete generation, local or remote, as the shim would pick
        tier = _s3()
        remote = tier.generations(key) if isinstance(tier, S3Tier) else []
        if remote and remote[-1] > generation.number:
            generation = tier.download(store, key, remote[-1]) if isinstance(tier, S3Tier) else generation
    image = args.image or generation.manifest.identity.image
    if not image:
        _stderr(f"kybernate restore: error: {key}@{generation.number} names no image: pass --image")
        return 2
    try:
        with open(os.path.join(generation.path, "spec.dump")) as f:
            process = (json.load(f).get("process") or {})
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read the checkpointed spec of {key}@{generation.number}: {err}") from err
    argv = [args.ctr, "--address", args.address, "--namespace", args.namespace, "run", "-d",
            "--runtime", args.runtime,
            "--annotation", f"{RESTORE_ANNOTATION}=store:{key}@{generation.number}",
            *[f"--env={e}" for e in process.get("env") or []],
            *(["--cwd", process["cwd"]] if process.get("cwd") else []),
            image, args.new_id, *(process.get("args") or [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        _stderr(f"kybernate restore: error: {args.ctr} not found: pass --ctr PATH")
        return 2
    if done.returncode != 0:
        _stderr(f"kybernate restore: error: ctr run failed ({done.returncode}): {done.stderr.strip()}")
        return 1
    _stderr(f"restored {key}@{generation.number} as {args.new_id} ({image}) in namespace {args.namespace}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """The generation's files, verified against its manifest first, as a plain tar in the CRI checkpoint
    archive's layout (checkpoint/, rootfs-diff.tar, deleted.files, spec.dump, config.dump; manifest.json
    too). Written beside the target and renamed: an interrupted export leaves no archive."""
    import tarfile
    import tempfile

    key, number = store_layout.parse_reference(args.reference.removeprefix("store:"))
    store = store_layout.Store(args.store)
    generation = store.open(key, number)
    store.verify(generation)
    target = os.path.abspath(args.output)
    fd, temp = tempfile.mkstemp(prefix=".kybernate-export-", suffix=".tar", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            names = [f.path for f in generation.manifest.files] + [store_layout.MANIFEST]
            # Directories first, as entries of their own: readers (checkpointctl) look for `checkpoint/`.
            dirs = sorted({"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)})
            for name in dirs + names:
                tar.add(os.path.join(generation.path, name), arcname=name, recursive=False)
        os.chmod(temp, 0o600)
        os.rename(temp, target)
    except OSError as err:
        os.unlink(temp)
        raise StoreError(f"cannot write {target}: {err.strerror or err}") from err
    except BaseException:
        os.unlink(temp)
        raise
    _stderr(f"exported {key}@{generation.number} to {target} ({store_layout.human(os.path.getsize(target))})")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from kybernate.hooks.api.store_registry import Registry, collect
    from kybernate.hooks.api.store_s3 import S3Tier

    tier = _s3()  # retention reaches S3 too when the tier is configured ($KYBERNATE_S3_BUCKET, ...)
    report = collect(store_layout.Store(args.store), Registry(args.registry), keep=args.keep,
                     budget_bytes=args.budget, remote=tier if isinstance(tier, S3Tier) else None)
    _report_gc(report)
    return 0


def _report_gc(report: object) -> None:
    from kybernate.hooks.api.store_registry import GcReport

    assert isinstance(report, GcReport)
    for line in report.removed:
        _stderr(f"removed {line}")
    if report.over_budget_by:
        _stderr(f"warning: the local store is {store_layout.human(report.over_budget_by)} over its budget and "
                "holds no copy that another tier also has: nothing was evicted")


def _checkpoint(args: argparse.Namespace) -> int:
    """A thin client of hookd's Store.Checkpoint: hookd pauses, dumps into its store, indexes and queues the
    upload; this prints the phases as they stream in and the result."""
    from kybernate.hooks.api.client import HookdClient, HookdError, HookdUnavailable, StoreProgress

    from .progress import PhaseProgress

    if args.key is not None:
        try:
            store_layout.validate_key(args.key)
        except StoreError as err:
            _stderr(f"kybernate checkpoint: error: {err}")
            return 1
    show = PhaseProgress(quiet=args.quiet)

    def on_progress(p: StoreProgress) -> None:
        show.update(p.phase, p.bytes_done, p.bytes_total)

    async def call() -> object:
        async with HookdClient(args.socket) as client:
            return await client.store_checkpoint(args.namespace, args.container_id, args.key or "",
                                                 leave_running=args.leave_running, deadline_s=args.timeout,
                                                 reason="cli", on_progress=on_progress)

    try:
        result = asyncio.run(call())
    except HookdUnavailable:
        show.close()
        _stderr(f"kybernate checkpoint: error: kybernate-hookd is not running at {args.socket} (it runs store "
                "checkpoints): start kybernate-hookd (systemctl start kybernate-hookd), or pass --socket")
        return 1
    except HookdError as err:
        show.close()
        _stderr(f"kybernate checkpoint: error: {err.message} [{err.code_name}]")
        return 1
    except KeyboardInterrupt:
        show.close()
        _stderr("kybernate checkpoint: interrupted (hookd finishes or rolls back the checkpoint on its own)")
        return 130
    show.close()
    from kybernate.hooks.api.model import StoreCheckpointResult

    assert isinstance(result, StoreCheckpointResult)
    out = {"key": result.key, "generation": result.generation, "path": result.path, "size": result.size_bytes,
           "seconds": round(result.total_s, 4), "pause_s": round(result.pause_s, 4),
           "phases": {k: round(v, 4) for k, v in sorted(result.phase_s.items())},
           "upload_queued": result.upload_queued, **_manifest_summary(result.path)}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    if not args.quiet:
        _stderr(f"stored {result.key}@{result.generation}: {store_layout.human(result.size_bytes)} at {result.path} "
                f"in {result.total_s:.2f}s (paused {result.pause_s:.2f}s)"
                + ("; upload queued (kybernate ls shows it)" if result.upload_queued else ""))
    return 0


def _manifest_summary(path: str) -> dict[str, object]:
    """Files and GPU summary of the generation hookd wrote (the CLI runs on the same node)."""
    try:
        with open(os.path.join(path, store_layout.MANIFEST)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {"files": len(data.get("files") or []), "gpu": data.get("gpu") or {}}


def _s3() -> object | None:
    """The configured S3 tier, or None when $KYBERNATE_S3_BUCKET is unset."""
    from kybernate.hooks.api.store_s3 import S3Config, S3Tier

    config = S3Config.from_env()
    return S3Tier(config) if config else None


def _prefetch(args: argparse.Namespace) -> int:
    from kybernate.hooks.api.store_registry import UPLOADED, Registry
    from kybernate.hooks.api.store_s3 import S3Tier

    from .progress import PhaseProgress

    key, number = store_layout.parse_reference(args.reference.removeprefix("store:"))
    tier = _s3()
    if tier is None:
        _stderr("kybernate prefetch: error: the S3 tier is not configured (set $KYBERNATE_S3_BUCKET, "
                "see docs/store.md)")
        return 2
    assert isinstance(tier, S3Tier)
    # The size to show progress against; download() itself says when there is no such generation.
    have = tier.generations(key)
    if number is None and have:
        number = have[-1]
    total = tier.manifest(key, number).size if number in have and \
        number not in store_layout.Store(args.store).generations(key) else 0
    show = PhaseProgress(quiet=args.quiet)
    started = time.monotonic()
    try:
        generation = tier.download(store_layout.Store(args.store), key, number,
                                   progress=lambda n: show.add("download", n, total))
    finally:
        show.close()
    seconds = time.monotonic() - started
    try:
        Registry(args.registry).record_local(generation, remote=True, state=UPLOADED)
    except StoreError as err:
        _stderr(f"kybernate prefetch: warning: {err}")
    if args.json:
        print(json.dumps({"key": key, "generation": generation.number, "path": generation.path,
                          "size": generation.manifest.size, "seconds": round(seconds, 4)}, sort_keys=True))
    if not args.quiet:
        _stderr(f"prefetched {key}@{generation.number} into {generation.path}: "
                f"{store_layout.human(generation.manifest.size)} in {seconds:.2f}s")
    return 0
