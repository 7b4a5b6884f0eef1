"""`kybernate park|wake <container>` and `kybernate status`: kybernate-hookd's Standby service (docs/standby.md).

    kybernate status [NAME] [--json] [--socket PATH]
    kybernate park NAME [--reason TEXT] [--tier ram|disk] [--socket PATH]
    kybernate wake NAME [--socket PATH]

NAME is a container id, a unique prefix of it, or namespace/id.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from kybernate.hooks.api import DEFAULT_SOCKET

if TYPE_CHECKING:
    from kybernate.api import standby_pb2 as pb

VERBS = ("park", "wake", "status")


def wants_standby(argv: list[str]) -> bool:
    return bool(argv) and argv[0] in VERBS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kybernate", description="Kybernate standby: park, wake, status")
    verbs = parser.add_subparsers(dest="verb", required=True)
    st = verbs.add_parser("status", help="GPU workloads: tier, idle time, VRAM, host RAM, park/wake durations, signals")
    st.add_argument("name", nargs="?", default="", metavar="NAME")
    st.add_argument("--json", action="store_true", help="one JSON object per workload")
    pk = verbs.add_parser("park", help="park a workload now (ram: VRAM to host RAM, frozen; disk: hibernated)")
    pk.add_argument("name", metavar="NAME")
    pk.add_argument("--reason", default="", help="recorded and shown in status")
    pk.add_argument("--tier", choices=("ram", "disk"), default="",
                    help="ram or disk (hibernate into the store; on a RAM-parked workload: demote) [its policy]")
    wk = verbs.add_parser("wake", help="wake a parked workload now")
    wk.add_argument("name", metavar="NAME")
    for p in (st, pk, wk):
        p.add_argument("--socket", default=DEFAULT_SOCKET, help="kybernate-hookd's socket [%(default)s]")
        p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for hookd [%(default)s]")
    args = parser.parse_args(argv)
    # gRPC and the messages only now: `kybernate` imports this module for every verb (hooks/cli/checkpoint_archive.py).
    import grpc

    from kybernate.api import standby_pb2 as pb
    from kybernate.api import standby_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{args.socket}") as channel:
            stub = standby_pb2_grpc.StandbyStub(channel)  # type: ignore[no-untyped-call]  # generated
            if args.verb == "status":
                found = list(stub.Status(pb.StatusRequest(name=args.name), timeout=args.timeout).workloads)
                print(render_json(found) if args.json else render(found))
            elif args.verb == "park":
                request = pb.ParkRequest(name=args.name, reason=args.reason, tier=args.tier)
                print(render([stub.Park(request, timeout=args.timeout)]))
            else:
                print(render([stub.Wake(pb.WakeRequest(name=args.name), timeout=args.timeout)]))
    except grpc.RpcError as err:
        code: Any = err.code()
        details: Any = err.details()
        print(f"kybernate {args.verb}: error: {code.name}: {details}", file=sys.stderr)
        return 1
    return 0


def render_json(found: list[pb.WorkloadStatus]) -> str:
    from google.protobuf.json_format import MessageToDict

    rows = [MessageToDict(w, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for w in found]
    return "\n".join(json.dumps(row, sort_keys=True) for row in rows)


def render(found: list[pb.WorkloadStatus]) -> str:
    if not found:
        return "no GPU workloads"
    rows = [("CONTAINER", "STATE", "TIER", "IDLE", "VRAM", "HOST RAM", "PARK", "WAKE", "POLICY", "SIGNALS")]
    details: list[str] = []
    for w in found:
        policy = (f"{'on' if w.opted_in else 'off'} idle={w.idle_period_s:.0f}s wake={w.wake} prio={w.priority}"
                  if not w.policy_error else "invalid")
        rows.append((f"{w.namespace}/{w.container_id[:20]}", w.state, w.tier or "-", f"{w.idle_for_s:.0f}s",
                     _size(w.vram_bytes), _size(w.host_ram_bytes), _secs(w.last_park_s), _secs(w.last_wake_s), policy,
                     " ".join(f"{k}={v}" for k, v in sorted(w.signals.items())) or "-"))
        name = f"{w.namespace}/{w.container_id}"
        if w.reason:
            details.append(f"{name}: parked by {w.parked_by}: {w.reason}")
        if w.policy_error:
            details.append(f"{name}: policy refused: {w.policy_error}")
        if w.last_error:
            details.append(f"{name}: last attempt failed: {w.last_error}")
        if w.listeners:
            details.append(f"{name}: listening " + ", ".join(f"{x.port} ({x.pending} pending)" for x in w.listeners))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines + details)


def _size(n: int) -> str:
    return "-" if not n else f"{n / (1 << 30):.2f} GiB"


def _secs(s: float) -> str:
    return "-" if not s else f"{s:.2f}s"
