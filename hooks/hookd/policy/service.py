"""The Standby gRPC servicer (proto/kybernate/api/standby.proto): one short method per RPC; the controller does
the work, and KybernateError subclasses become statuses here only. Anything else is logged, answered INTERNAL."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from kybernate.api import standby_pb2 as pb
from kybernate.api import standby_pb2_grpc
from kybernate.hooks.api.errors import Code, KybernateError

from ..metrics import Metrics
from .controller import MAX_ROOM_GPUS as MAX_NEEDS
from .controller import Controller, WorkloadStatus

log = logging.getLogger(__name__)

T = TypeVar("T")
_STATUS = {Code(code.value[0]): code for code in grpc.StatusCode}


def status_to_pb(s: WorkloadStatus) -> pb.WorkloadStatus:
    return pb.WorkloadStatus(
        namespace=s.namespace, container_id=s.container_id, state=s.state, tier=s.tier, opted_in=s.opted_in,
        policy_error=s.policy_error, idle_for_s=s.idle_for_s, idle_period_s=s.idle_period_s, wake=s.wake,
        priority=s.priority, vram_bytes=s.vram_bytes, gpus=list(s.gpus), host_ram_bytes=s.host_ram_bytes,
        last_park_s=s.last_park_s, last_wake_s=s.last_wake_s, parked_by=s.parked_by, reason=s.reason,
        signals=s.signals, listeners=[pb.Listener(port=p, pending=n) for p, n in s.listeners],
        last_error=s.last_error, woken_by=s.woken_by, parks=s.parks)


class StandbyService(standby_pb2_grpc.StandbyServicer):
    """`controller` None: hookd runs without --standby, and every call is answered UNAVAILABLE saying so."""

    def __init__(self, controller: Controller | None, metrics: Metrics) -> None:
        self._controller = controller
        self._metrics = metrics

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:  # noqa: N802
        controller = await self._enabled(context)

        async def work() -> list[WorkloadStatus]:
            return controller.statuses(request.name)

        found = await self._edge("Standby.Status", context, work())
        return pb.StatusResponse(workloads=[status_to_pb(s) for s in found])

    async def Park(self, request: pb.ParkRequest, context: Any) -> pb.WorkloadStatus:  # noqa: N802
        controller = await self._enabled(context)
        result = await self._edge("Standby.Park", context, controller.park(request.name, "api", request.reason,
                                                                             request.tier))
        return status_to_pb(result)

    async def Wake(self, request: pb.WakeRequest, context: Any) -> pb.WorkloadStatus:  # noqa: N802
        controller = await self._enabled(context)
        return status_to_pb(await self._edge("Standby.Wake", context, controller.wake(request.name, "api")))

    async def MakeRoom(self, request: pb.MakeRoomRequest, context: Any) -> pb.MakeRoomResponse:  # noqa: N802
        controller = await self._enabled(context)
        needs: dict[str, int] = {}
        for need in request.needs[:MAX_NEEDS + 1]:
            needs[need.gpu] = needs.get(need.gpu, 0) + need.bytes
        victims, reason = await self._edge("Standby.MakeRoom", context, controller.make_room(
            request.namespace, request.container_id, request.bundle, needs, request.why))
        return pb.MakeRoomResponse(victims=list(victims), reason=reason)

    async def _enabled(self, context: Any) -> Controller:
        if self._controller is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kybernate-hookd runs without --standby: "
                                                             "start it with --standby to park and wake workloads")
            raise AssertionError("context.abort returned")
        return self._controller

    async def _edge(self, rpc: str, context: Any, work: Awaitable[T]) -> T:
        try:
            result = await work
        except KybernateError as err:
            status = _STATUS.get(Code.from_wire(int(err.code)), grpc.StatusCode.UNKNOWN)
            self._metrics.request(rpc, status.name)
            await context.abort(status, err.message)
            raise AssertionError("context.abort returned") from err
        except Exception as err:
            self._metrics.request(rpc, grpc.StatusCode.INTERNAL.name)
            log.exception("request crashed", extra={"fields": {"rpc": rpc}})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in kybernate-hookd ({type(err).__name__}): "
                                                          "see its log (journalctl -u kybernate-hookd)")
            raise AssertionError("context.abort returned") from err
        self._metrics.request(rpc, "ok")
        return result
