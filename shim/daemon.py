"""The shim daemon: one asyncio loop serving containerd on our socket, forwarding to the runc shim.

It lives exactly as long as its child: when the runc shim exits (after containerd's Shutdown, or
because it was killed) the daemon answers what is in flight, removes its socket and exits, and
containerd cleans up as it would for any shim.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field, replace

# Imported at module level on purpose: `start` imports this module while the runc shim starts, so
# these imports overlap that instead of delaying the first call after the fork.
from . import logs
from .events import EventsProxy
from .gpu_steps import GpuDriver
from .passlane import Lane
from .runtime_options import KybernateOptions, RuntimeConfig
from .service import TaskService
from .ttrpc.server import Server
from .upstream import Upstream

log = logging.getLogger(__name__)

# After the child is gone, how long in-flight calls (all failing fast now) may take to be answered.
DRAIN_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    namespace: str
    group: str
    address: str
    bundle: str
    child_address: str
    child_task_api: int
    debug: bool = False
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    events_address: str = ""  # containerd's TTRPC_ADDRESS: where the child's events go on to


# How long a daemon forked before its runc shim started waits to be handed it: the start's own bound, and some.
HANDOFF_TIMEOUT_S = 40.0


class NotHandedOver(Exception):
    """`start` gave up before it had a runc shim for this daemon (it removes what it made itself)."""


def run(config: DaemonConfig, listener: socket.socket) -> int:
    return run_handed_over(config, listener, None)


def run_handed_over(config: DaemonConfig, listener: socket.socket, handoff: int | None) -> int:
    """Serve on `listener`; with `handoff`, first wait there for the runc shim `start` is starting meanwhile
    (shim/manager.py hand_over). Without one, it exits and leaves the socket to `start`, which owns it."""
    began = time.perf_counter()
    logs.setup(config.bundle, config.debug)
    try:
        asyncio.run(serve(config, listener, began, handoff))
        code = 0
    except NotHandedOver as err:
        log.debug("exiting unused", extra={"fields": {"why": str(err)}})
        return 1
    except Exception:
        log.exception("shim daemon failed")
        code = 1
    _cleanup(config)
    return code


async def _handed_over(handoff: int) -> tuple[str, int]:
    """The runc shim's address and task API from `start`, read from the pipe up to its EOF."""
    from .manager import HANDOFF_MAX, parse_handoff

    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    data = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(handoff, HANDOFF_MAX)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data.extend(chunk)
        if (not chunk or len(data) > HANDOFF_MAX) and not done.done():
            done.set_result(bytes(data))

    os.set_blocking(handoff, False)
    loop.add_reader(handoff, readable)
    try:
        message = await asyncio.wait_for(done, HANDOFF_TIMEOUT_S)
    except TimeoutError:
        raise NotHandedOver(f"no runc shim within {HANDOFF_TIMEOUT_S:.0f}s") from None
    finally:
        loop.remove_reader(handoff)
        os.close(handoff)
    child = parse_handoff(message)
    if child is None:
        raise NotHandedOver("start failed" if not message else f"unreadable handoff {message[:80]!r}")
    return child.address, child.task_api


_drivers: dict[tuple[str, float], GpuDriver] = {}


def hookd_driver(options: KybernateOptions) -> GpuDriver:
    """One hookd connection per socket for the daemon's life; only GPU containers ever get here."""
    key = (options.hookd_socket, options.hookd_timeout_s)
    if key not in _drivers:
        from .hookd_driver import HookdDriver

        _drivers[key] = HookdDriver(*key)
    return _drivers[key]


async def serve(
    config: DaemonConfig, listener: socket.socket, began: float | None = None, handoff: int | None = None
) -> None:
    began = time.perf_counter() if began is None else began
    waited: dict[str, str] = {}
    if handoff is not None:
        child_address, child_task_api = await _handed_over(handoff)
        config = replace(config, child_address=child_address, child_task_api=child_task_api)
        handed = time.perf_counter()
        waited, began = {"waited_ms": f"{(handed - began) * 1000:.1f}"}, handed
    upstream = await Upstream.connect(config.child_address, config.child_task_api)
    events = EventsProxy(config.events_address) if config.events_address else None
    service = TaskService(upstream, config.namespace, config.runtime, hookd_driver, events)
    lane = Lane.open(config.child_address, upstream.service, config.events_address)
    service.lane = lane
    server = Server(service.handle, pass_through=service.pass_through, adopt=lane.adopt if lane else None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "serving",
        extra={"fields": {"ns": config.namespace, "group": config.group, "child": config.child_address,
                          "task_api": config.child_task_api, "pid": os.getpid(), "lane": lane is not None,
                          # From the fork (or from being handed the runc shim, after waiting waited_ms for it)
                          # to serving: the part of a pod's start containerd waits on last.
                          "ready_ms": f"{(time.perf_counter() - began) * 1000:.1f}", **waited}},
    )
    serving = asyncio.create_task(server.serve_socket(listener), name="ttrpc-server")
    child_gone = asyncio.create_task(upstream.wait_closed(), name="upstream-closed")
    stopped = asyncio.create_task(stop.wait(), name="signal")
    done, _ = await asyncio.wait({serving, child_gone, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if serving in done and serving.exception() is not None:
        log.error("ttrpc server stopped", exc_info=serving.exception())
    reason = "runc shim exited" if child_gone in done else "signal" if stopped in done else "server stopped"
    # lane_calls: calls the pass lane answered or passed on without Python, over the daemon's life.
    log.info("shutting down", extra={"fields": {"reason": reason, **({"lane_calls": lane.taken} if lane else {})}})
    if child_gone in done:
        # The child is gone, so nothing is left for `delete` to clean up: say so at once, so that
        # containerd's `delete` (it may run already) takes the native client's short path instead of
        # searching for an orphaned runc shim (shim/native/shim_client.c). The group state goes first: a
        # `delete` that finds neither it nor a listening socket knows there is no orphan.
        _forget_group(config)
        await server.drain(DRAIN_TIMEOUT_S)
    server.close()
    await server.wait_closed()
    for task in (serving, child_gone, stopped):
        task.cancel()
    await asyncio.gather(serving, child_gone, stopped, return_exceptions=True)
    if lane is not None:
        lane.close()
    await upstream.close()
    if events is not None:
        await events.close()


def _cleanup(config: DaemonConfig) -> None:
    from .manager import GroupState, remove_socket

    # Socket first: a daemon killed in between leaves its group state, by which `delete` finds the child.
    remove_socket(config.address)
    GroupState.remove(config.address)


def _forget_group(config: DaemonConfig) -> None:
    """The child exited: its record first (no orphan to find), then our socket and the child's."""
    from .manager import SOCKET_DIR, GroupState, remove_socket
    from .ttrpc.address import socket_path

    GroupState.remove(config.address)
    remove_socket(config.address)
    # containerd 1.6's runc shim removes, on its way out, the socket its bundle's `address` file names: ours,
    # which we wrote there. Its own would stay behind in /run/containerd/s, one per pod. (2.x's removes its own.)
    if config.child_address and socket_path(config.child_address).startswith(SOCKET_DIR + "/"):
        remove_socket(config.child_address)
