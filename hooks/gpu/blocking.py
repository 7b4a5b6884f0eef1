"""run_blocking(): the one way hookd runs a blocking call (driver, NVML, the cuda-checkpoint binary).

A driver call cannot be interrupted once it started: the target process is mid-transition. So a
caller that is cancelled keeps waiting for the call to return before it lets the cancellation
through ("better stuck than orphaned"), and every call in flight is listed in `in_flight()` so a
daemon that is asked to stop can say what it is waiting for.

`timeout_s` is for calls that may never return (the driver blocks on a stopped or frozen target):
when it expires the waiter gets StillRunning, which carries the future so the caller can settle the
process when the call does return. The call itself keeps its thread until then.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Call:
    """One blocking call in flight: what it is and since when (time.monotonic())."""

    what: str
    started: float
    id: int = field(default_factory=lambda: next(_ids))

    def age(self) -> float:
        return time.monotonic() - self.started


_IN_FLIGHT: dict[int, Call] = {}  # touched on the event loop thread only (done callbacks run there)


def in_flight() -> list[Call]:
    """Every blocking call started through run_blocking that has not returned yet, oldest first."""
    return sorted(_IN_FLIGHT.values(), key=lambda c: c.started)


class StillRunning(Exception):
    """The call did not return within timeout_s. It goes on in its thread; `future` completes with it."""

    def __init__(self, what: str, waited_s: float, future: asyncio.Future[Any]) -> None:
        super().__init__(f"{what} did not return within {waited_s:.3g} s")
        self.what = what
        self.waited_s = waited_s
        self.future = future


async def run_blocking(fn: Callable[..., T], /, *args: Any, what: str, executor: Executor | None = None,
                       timeout_s: float | None = None) -> T:
    """Run fn(*args) in `executor` and return its result, shielded from the caller's cancellation."""
    loop = asyncio.get_running_loop()
    call = Call(what, time.monotonic())
    future: asyncio.Future[T] = loop.run_in_executor(executor, functools.partial(fn, *args))
    _IN_FLIGHT[call.id] = call  # only once submitted: an executor that is shut down raises above
    future.add_done_callback(lambda _: _IN_FLIGHT.pop(call.id, None))
    deadline = None if timeout_s is None else loop.time() + timeout_s
    cancelled = False
    while not future.done():
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            if cancelled:
                # Nobody is left to settle it: it stays listed in in_flight() until it returns.
                log.error("cancelled caller gave up waiting for a blocking call", extra={"fields": {"call": what}})
                raise asyncio.CancelledError
            raise StillRunning(what, timeout_s or 0.0, future)
        try:
            # asyncio.wait neither cancels `future` on timeout nor when the waiter is cancelled.
            await asyncio.wait({future}, timeout=remaining)
        except asyncio.CancelledError:
            if not cancelled:
                log.warning("caller cancelled; waiting for the blocking call to return first",
                            extra={"fields": {"call": what, "age_s": round(call.age(), 3)}})
            cancelled = True
    if cancelled:
        if future.exception() is not None:
            log.warning("blocking call failed after its caller was cancelled",
                        extra={"fields": {"call": what, "error": str(future.exception())}})
        raise asyncio.CancelledError
    return future.result()
