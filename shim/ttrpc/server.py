"""A ttrpc server on unix sockets: one task per connection, one task per request (or none, passed through).

Structure: serve_socket() owns a TaskGroup holding its accept loop and one task per connection; each
connection owns a TaskGroup holding one task per in-flight request. Closing the server cancels the
connection tasks, which cancels their requests and closes their sockets; nothing is left running.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .address import socket_path
from .connection import Connection, from_socket
from .errors import Code, ConnectionClosed, TTRPCError
from .frames import Event
from .limits import BufferBudget, Limits
from .protocol import (
    Ignored,
    Metadata,
    RequestReceived,
    Response,
    ServerProtocol,
    StreamRejected,
)

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 64
SOCKET_MODE = 0o600  # containerd and the shim run as the same user (root)
_ACCEPT_RETRY_S = 0.1  # after EMFILE and friends
_ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED})
_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True, slots=True)
class Call:
    """One incoming request, as a handler sees it."""

    service: str
    method: str
    payload: bytes
    metadata: Metadata
    timeout_nano: int  # as the client sent it; the server already enforces it
    stream_id: int
    # When the server cancels the handler (loop.time(), from timeout_nano as the request arrived);
    # None: no deadline. For handlers that pass a deadline on to calls of their own.
    deadline: float | None = None
    # The request as it came, encoded (b"" for calls made up locally): passed on without encoding it again.
    body: bytes = field(default=b"", compare=False, repr=False)


# Returns the response payload; raises TTRPCError to answer with that status.
Handler = Callable[[Call], Awaitable[bytes]]
# Called with the response of a passed-through call, synchronously, when it arrives.
Answer = Callable[[Response], None]
# A handler's fast path for calls it would only pass on to another ttrpc peer: sends the call on at once
# and returns how to forget it (the connection closed, or the deadline passed), or None to leave the call
# to the handler. Such a call runs without a task of its own: no task, no future, no extra turn of the
# event loop between the two reads and the two writes (docs/benchmarks.md, the proxied call).
PassThrough = Callable[[Call, Answer], Callable[[], None] | None]
# Takes an accepted, admitted connection and returns the socket to serve in its place (shim/passlane.py: the
# pod daemon's pass lane answers some calls below Python and hands the rest on through that socket).
Adopt = Callable[[socket.socket], socket.socket]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


class Server:
    def __init__(self, handler: Handler, *, require_same_uid: bool = True, limits: Limits | None = None,
                 pass_through: PassThrough | None = None, adopt: Adopt | None = None) -> None:
        self._handler = handler
        self._pass_through = pass_through
        self._adopt = adopt
        self._require_same_uid = require_same_uid
        self.limits = limits or Limits()
        self.budget = BufferBudget(self.limits)  # bytes all connections hold: frames and running payloads
        self._closing = asyncio.Event()
        self._idle = asyncio.Event()  # set while no serve_socket runs and no connection is open
        self._idle.set()
        self._no_calls = asyncio.Event()  # set while no request is in flight
        self._no_calls.set()
        self._serving = 0
        self._connections: dict[_ServerConnection, asyncio.Task[None]] = {}
        self._in_flight = 0
        self._next_connection = 1

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        """Requests whose handler is running or whose answer is being written."""
        return self._in_flight

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def serve_path(self, path: str) -> None:
        """Bind a new socket at `path` ("unix://" prefix allowed), mode 0600, and serve it until close().

        An existing file at the path is an error (EADDRINUSE): removing a stale socket is the caller's
        decision. The socket file is removed when serving ends.
        """
        path = socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        try:
            # Before listen(): until then connect() is refused, so no one gets in under wider modes.
            os.chmod(path, SOCKET_MODE)
            bound = os.stat(path)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            os.unlink(path)
            raise
        try:
            await self.serve_socket(sock)
        finally:
            try:
                current = os.stat(path)
                if (current.st_dev, current.st_ino) == (bound.st_dev, bound.st_ino):
                    os.unlink(path)
            except FileNotFoundError:
                pass

    async def serve_socket(self, sock: socket.socket) -> None:
        """Accept and serve connections on a bound, listening unix socket until close().

        The socket is closed on return. Cancelling this coroutine stops this listener and drops its
        connections; close() does that for every listener. An accept error that is not transient
        (EMFILE and the like are retried) drops this listener's connections and is raised.
        """
        if self._closing.is_set():
            sock.close()
            return
        sock.setblocking(False)
        self._serving += 1
        self._idle.clear()
        mine: set[asyncio.Task[None]] = set()  # this listener's connection tasks
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                # Outside the group, so that its error is raised as itself, not in an ExceptionGroup.
                accept = asyncio.create_task(self._accept(sock, tasks, mine), name="ttrpc-accept")
                closing = asyncio.create_task(self._closing.wait(), name="ttrpc-closing")
                try:
                    await asyncio.wait([accept, closing], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (accept, closing, *mine):
                        task.cancel()
                    await asyncio.wait([accept, closing])
                if not accept.cancelled():
                    failure = accept.exception()
        finally:
            sock.close()
            self._serving -= 1
            self._update_idle()
        if failure is not None:
            log.error("accept failed; listener stopped", extra={"fields": {"error": failure}})
            raise failure

    def close(self) -> None:
        """Stop accepting, cancel in-flight requests and close every connection. Idempotent."""
        if not self._closing.is_set():
            log.info("closing", extra={"fields": {"connections": len(self._connections), "in_flight": self._in_flight}})
        self._closing.set()
        for task in self._connections.values():
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until close() was called and every listener and connection has stopped."""
        await self._closing.wait()
        await self._idle.wait()

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the requests in flight to be answered; True if they were."""
        try:
            await asyncio.wait_for(self._no_calls.wait(), timeout)
            return True
        except TimeoutError:
            log.warning("requests still in flight after drain", extra={"fields": {"in_flight": self._in_flight}})
            return False

    # --- internals ----------------------------------------------------------------------------------

    async def _accept(self, sock: socket.socket, tasks: asyncio.TaskGroup, mine: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn_sock, _ = await loop.sock_accept(sock)
            except OSError as err:
                if err.errno not in _ACCEPT_TRANSIENT:
                    raise
                log.error("accept failed; retrying", extra={"fields": {"error": err}})
                await asyncio.sleep(_ACCEPT_RETRY_S)
                continue
            if self._closing.is_set():  # accepted just as close() ran: it would never be cancelled
                conn_sock.close()
                return
            name = f"server#{self._next_connection}"
            self._next_connection += 1
            if not self._admit(conn_sock, name):
                conn_sock.close()
                continue
            if len(self._connections) >= self.limits.max_connections:
                log.warning("refused connection: too many open",
                            extra={"fields": {"conn": name, "open": len(self._connections),
                                              "limit": self.limits.max_connections}})
                conn_sock.close()
                continue
            if self._adopt is not None:  # admitted as the peer it is; served through what adopt returns
                conn_sock = self._adopt(conn_sock)
            connection = _ServerConnection(self, name)
            task = tasks.create_task(connection.run(conn_sock), name=f"ttrpc {name}")
            mine.add(task)
            task.add_done_callback(mine.discard)
            self._connections[connection] = task
            self._idle.clear()

    def _admit(self, sock: socket.socket, name: str) -> bool:
        if not self._require_same_uid:
            return True
        try:
            pid, uid, _ = peer_credentials(sock)
        except OSError as err:
            log.warning("refused connection: no peer credentials", extra={"fields": {"conn": name, "error": err}})
            return False
        if uid != os.geteuid():
            log.warning(
                "refused connection from another user", extra={"fields": {"conn": name, "pid": pid, "uid": uid}}
            )
            return False
        return True

    def _connection_done(self, connection: _ServerConnection) -> None:
        self._connections.pop(connection, None)
        self._update_idle()

    def _update_idle(self) -> None:
        if self._serving == 0 and not self._connections:
            self._idle.set()

    def _call_started(self) -> None:
        self._in_flight += 1
        self._no_calls.clear()

    def _call_done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._no_calls.set()


class _ServerConnection:
    """One accepted connection: the protocol state, its requests in flight, its socket."""

    def __init__(self, server: Server, name: str) -> None:
        self._server = server
        self.name = name
        self._protocol = ServerProtocol()
        self._conn: Connection | None = None
        self._tasks: asyncio.TaskGroup | None = None  # None once requests may no longer start
        self._requests: dict[int, asyncio.Task[None] | _Passing] = {}

    async def run(self, sock: socket.socket) -> None:
        try:
            conn = await from_socket(sock, name=self.name, budget=self._server.budget, backpressure=True)
        except BaseException as err:
            sock.close()
            self._server._connection_done(self)
            if not isinstance(err, Exception):
                raise
            log.error("cannot set up connection", extra={"fields": {"conn": self.name, "error": err}})
            return
        self._conn = conn
        log.debug("connection accepted", extra={"fields": {"conn": self.name}})
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                conn.start(self._on_frame, self._on_closed)
                try:
                    await conn.wait_closed()
                finally:
                    # Stop reading before the group ends so no request starts in a finished group.
                    self._tasks = None
                    conn.close()
                    for request in list(self._requests.values()):
                        request.cancel()
        finally:
            try:
                await conn.wait_closed()
            finally:
                self._server._connection_done(self)
                log.debug("connection closed", extra={"fields": {"conn": self.name}})

    def _on_closed(self, reason: BaseException | None) -> None:
        # The peer is gone or broke the protocol: nobody is left to read the answers.
        self._tasks = None
        for request in list(self._requests.values()):
            request.cancel()

    def _on_frame(self, frame: Event) -> None:
        event = self._protocol.receive(frame)  # a ProtocolError drops the connection
        if isinstance(event, RequestReceived):
            if self._tasks is None:
                return
            refused = self._refusal(event)
            if refused is not None:
                log.warning("refused request", extra={"fields": {"conn": self.name, "stream": event.stream_id,
                                                                 "rpc": event.request.method, "why": refused}})
                self._answer_now(event.stream_id, Response.from_error(TTRPCError(Code.RESOURCE_EXHAUSTED, refused)))
                return
            self._server._call_started()
            request, sid = event.request, event.stream_id
            timeout = request.timeout_nano
            deadline = asyncio.get_running_loop().time() + timeout / 1e9 if timeout > 0 else None
            call = Call(request.service, request.method, request.payload, request.metadata, request.timeout_nano, sid,
                        deadline, event.body)
            size = len(request.payload)
            if self._server._pass_through is not None and request.timeout_nano >= 0 and self._pass(call, size):
                return
            task = self._tasks.create_task(self._serve(call), name=f"ttrpc {self.name} stream {sid}")
            self._requests[sid] = task
            # A done-callback, not a finally: it also runs for a task cancelled before it first ran.
            task.add_done_callback(lambda _: self._done(sid, size))
        elif isinstance(event, StreamRejected):
            log.warning(
                "rejected request",
                extra={"fields": {"conn": self.name, "stream": event.stream_id, "code": event.error.code.name,
                                  "error": event.error.message}},
            )
            self._answer_now(event.stream_id, Response.from_error(event.error))
        elif isinstance(event, Ignored):
            log.debug("ignored frame", extra={"fields": {"conn": self.name, "stream": event.stream_id,
                                                         "reason": event.reason}})

    def _refusal(self, event: RequestReceived) -> str | None:
        """Why this request may not run now (a cap of Limits), or None; when None its payload is reserved."""
        limit = self._server.limits.max_requests_per_connection
        if len(self._requests) >= limit:
            return f"{limit} requests already in flight on this connection; retry when one has been answered"
        assert self._conn is not None
        return self._conn.reserve(len(event.request.payload))

    async def _serve(self, call: Call) -> None:
        stream_id = call.stream_id
        debug = log.isEnabledFor(logging.DEBUG)  # the call's log line and its timing only when it is written
        started = time.monotonic() if debug else 0.0
        try:
            try:
                response = Response(payload=await self._call_handler(call))
            except TTRPCError as err:
                response = Response.from_error(err)
            if debug:
                self._log_call(call, response, started)
            await self._answer(stream_id, response)
        except Exception:
            log.exception("answering a request failed", extra={"fields": {"conn": self.name, "stream": stream_id}})

    def _log_call(self, call: Call, response: Response, started: float) -> None:
        log.debug(
            "call",
            extra={"fields": {"conn": self.name, "stream": call.stream_id, "rpc": f"{call.service}/{call.method}",
                              "code": response.status_code.name, "ms": round((time.monotonic() - started) * 1e3, 1)}},
        )

    # --- calls passed through without a task (Server(pass_through=...)) -----------------------------

    def _pass(self, call: Call, size: int) -> bool:
        """Offer the call to the pass-through; True if it took it (the answer comes to _passed)."""
        assert self._server._pass_through is not None
        passing = _Passing(self, call, size)
        try:
            forget = self._server._pass_through(call, passing.answer)
        except Exception:  # its bug must not take the connection down: the handler gets the call
            log.exception("pass-through failed", extra={"fields": {"conn": self.name, "stream": call.stream_id}})
            return False
        if forget is None:
            return False
        passing.forget = forget
        if call.deadline is not None:
            passing.timer = asyncio.get_running_loop().call_at(call.deadline, passing.expire)
        self._requests[call.stream_id] = passing
        return True

    def _passed(self, passing: _Passing, response: Response | None) -> None:
        """A passed-through call ended: answered, out of time (both with `response`), or dropped (None)."""
        sid = passing.call.stream_id
        if self._requests.get(sid) is not passing:
            return  # it ended already
        del self._requests[sid]
        if passing.timer is not None:
            passing.timer.cancel()
        if response is not None:
            if passing.started:
                self._log_call(passing.call, response, passing.started)
            conn = self._conn
            assert conn is not None
            if conn.writable or conn.closed:  # closed: _answer_now drops it, as _answer would
                self._answer_now(sid, response)
            elif self._tasks is not None:  # the peer is behind: wait for room in a task, as _serve does
                task = self._tasks.create_task(self._answer(sid, response), name=f"ttrpc {self.name} stream {sid}")
                self._requests[sid] = task
                task.add_done_callback(lambda _: self._done(sid, passing.size))
                return
        self._done(sid, passing.size)

    def _done(self, stream_id: int, payload_size: int) -> None:
        self._requests.pop(stream_id, None)
        assert self._conn is not None
        self._conn.release(payload_size)
        self._server._call_done()

    async def _call_handler(self, call: Call) -> bytes:
        """The handler's payload; every failure as a TTRPCError. Cancellation of this task propagates."""
        if call.timeout_nano < 0:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
        deadline = asyncio.timeout_at(call.deadline) if call.deadline is not None else None
        try:
            if deadline is None:  # no timer to arm (containerd sets none on most calls)
                return await self._server._handler(call)
            async with deadline:
                return await self._server._handler(call)
        except TTRPCError:
            raise
        except TimeoutError as err:
            if deadline is not None and deadline.expired():
                raise TTRPCError(Code.DEADLINE_EXCEEDED, "deadline exceeded") from None
            self._log_failure(call, err)
        except asyncio.CancelledError as err:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled: connection or server closing
            # A CancelledError nobody asked this task for (e.g. a future the handler awaited was
            # cancelled): answer it rather than leave the client waiting for ever.
            self._log_failure(call, err)
            raise TTRPCError(Code.CANCELLED, "call cancelled") from None
        except Exception as err:
            self._log_failure(call, err)
        raise TTRPCError(Code.UNKNOWN, "internal error")

    def _log_failure(self, call: Call, err: BaseException) -> None:
        log.error(
            "handler failed",
            exc_info=err,
            extra={"fields": {"conn": self.name, "stream": call.stream_id, "rpc": f"{call.service}/{call.method}"}},
        )

    async def _answer(self, stream_id: int, response: Response) -> None:
        conn = self._conn
        assert conn is not None
        try:
            await conn.send(lambda: ServerProtocol.response_frame(stream_id, response))
        except ConnectionClosed:
            log.debug("answer dropped: connection closed", extra={"fields": {"conn": self.name, "stream": stream_id}})

    def _answer_now(self, stream_id: int, response: Response) -> None:
        """An answer from the reader (a refusal): written at once; while answers cannot be written the
        connection reads no more frames, so these stay few."""
        conn = self._conn
        assert conn is not None
        try:
            conn.send_now(lambda: ServerProtocol.response_frame(stream_id, response))
        except ConnectionClosed:
            log.debug("answer dropped: connection closed", extra={"fields": {"conn": self.name, "stream": stream_id}})


class _Passing:
    """A call passed through without a task: how to forget it upstream, and its deadline's timer."""

    __slots__ = ("owner", "call", "size", "forget", "timer", "started")

    def __init__(self, owner: _ServerConnection, call: Call, size: int) -> None:
        self.owner = owner
        self.call = call
        self.size = size  # its payload's bytes, reserved until it ends
        self.forget: Callable[[], None] = _nothing
        self.timer: asyncio.TimerHandle | None = None
        # For the debug log line's duration, as _serve measures it: only when that line is written.
        self.started = time.monotonic() if log.isEnabledFor(logging.DEBUG) else 0.0

    def answer(self, response: Response) -> None:
        self.owner._passed(self, response)

    def expire(self) -> None:
        """The deadline passed: the answer _call_handler gives; a late answer upstream is dropped."""
        self.forget()
        self.owner._passed(self, Response.from_error(TTRPCError(Code.DEADLINE_EXCEEDED, "deadline exceeded")))

    def cancel(self) -> None:
        """The connection is closing: forget the call, answer nothing (as for a cancelled handler)."""
        self.forget()
        self.owner._passed(self, None)


def _nothing() -> None:
    pass
