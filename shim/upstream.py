"""The connection to our child, the stock runc shim, which serves task API v2 (1.6/1.7) or v3 (2.x)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

from .ttrpc.client import Client, OnAnswer
from .ttrpc.errors import Code, ConnectionClosed, TTRPCError
from .ttrpc.protocol import Response, renamed_request
from .ttrpc.server import Call

TASK_V2 = "containerd.task.v2.Task"
TASK_V3 = "containerd.task.v3.Task"
TASK_SERVICES = frozenset({TASK_V2, TASK_V3})

M = TypeVar("M", bound=Message)


class Upstream:
    """Forwards calls byte-for-byte, renaming only the service to the version the child serves."""

    def __init__(self, client: Client, task_api: int) -> None:
        self._client = client
        self.service = TASK_V3 if task_api >= 3 else TASK_V2

    @classmethod
    async def connect(cls, address: str, task_api: int, attempts: int = 50) -> Upstream:
        # The runc shim's socket is bound before its start returns, so this rarely retries.
        last: OSError | None = None
        for _ in range(attempts):
            try:
                return cls(await Client.connect(address), task_api)
            except OSError as err:
                last = err
                await asyncio.sleep(0.02)
        raise ConnectionError(f"cannot connect to the runc shim at {address}: {last}")

    async def forward(self, call: Call, payload: bytes | None = None) -> bytes:
        """The child's answer; a non-OK status is raised as the same TTRPCError, untouched."""
        try:
            response = await self._client.call_raw(
                self.service,
                call.method,
                call.payload if payload is None else payload,
                metadata=call.metadata,
                timeout_nano=call.timeout_nano,
            )
        except ConnectionClosed as err:
            raise TTRPCError(Code.UNAVAILABLE, "the runc shim closed its connection") from err
        error = response.error()
        if error is not None:
            raise error
        return response.payload

    def forward_now(self, call: Call, on_answer: OnAnswer) -> Callable[[], None] | None:
        """forward() without waiting: sends the call now; `on_answer` gets the child's Response as it came,
        or the error forward() would raise (UNAVAILABLE when the child's connection closed first). Returns
        how to forget the call, or None when it cannot be sent at once (then forward() waits or raises)."""

        def answered(result: Response | Exception) -> None:
            if isinstance(result, ConnectionClosed):
                error = TTRPCError(Code.UNAVAILABLE, "the runc shim closed its connection")
                error.__cause__ = result
                result = error
            on_answer(result)

        client = self._client
        if call.body:  # as containerd sent it, the service renamed if need be: nothing decoded or encoded again
            body = call.body if call.service == self.service else renamed_request(call.body, self.service)
            stream = client.call_now_encoded(body, answered)
        else:
            stream = client.call_now(self.service, call.method, call.payload, answered, metadata=call.metadata,
                                     timeout_nano=call.timeout_nano)
        if stream is None:
            return None
        return lambda: client.forget(stream)

    async def call(
        self, method: str, request: Message, reply: type[M], metadata: tuple[tuple[str, str], ...] = ()
    ) -> M:
        """A typed call of our own (Pids, Pause, Resume)."""
        try:
            payload = await self._client.call(self.service, method, request.SerializeToString(), metadata=metadata)
        except ConnectionClosed as err:
            raise TTRPCError(Code.UNAVAILABLE, "the runc shim closed its connection") from err
        return reply.FromString(payload)

    async def wait_closed(self) -> None:
        await self._client.wait_closed()

    async def close(self) -> None:
        await self._client.close()
