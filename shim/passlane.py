"""The pass lane: the pod daemon's pass-through below Python (shim/native/passlane.c), through ctypes.

The lane owns each containerd connection the server accepts and hands Python a socketpair's end instead;
the calls TaskService would only pass on to the runc shim, and the runc shim's events on their way to
containerd, go there and back without Python (the rules are in passlane.c's header). Python stays the only
place that decides: TaskService mirrors into the lane what those rules read (a task's pid, a plain Start,
whether any task is hibernated, waking or has GPU state) as it changes.

The library is built by `make venv` and by the node installer into the venv's lib/ (LIBRARY). Without it,
or with KYBERNATE_PASSLANE=off, every call goes through Python as before; the daemon logs which it serves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys

from .ttrpc.address import socket_path

log = logging.getLogger(__name__)

LIBRARY_NAME = "kybernate-passlane.so"
LIBRARY = os.path.join(sys.prefix, "lib", LIBRARY_NAME)
SWITCH_ENV = "KYBERNATE_PASSLANE"  # "off": no lane; a path: the library to load instead of LIBRARY

_loaded: dict[str, ctypes.CDLL] = {}


def load(path: str = LIBRARY) -> ctypes.CDLL | None:
    """The library at `path`, loaded once per process (kybernate-shimd loads it before it forks, so a pod
    daemon does not pay the dlopen); None if there is none. OSError: it is there but does not load."""
    lib = _loaded.get(path)
    if lib is None:
        if not os.path.exists(path):
            return None
        lib = ctypes.CDLL(path, use_errno=True)
        lib.kyb_lane_new.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.kyb_lane_new.restype = ctypes.c_void_p
        lib.kyb_lane_adopt.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.kyb_lane_adopt.restype = ctypes.c_int
        lib.kyb_lane_gate.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.kyb_lane_gate.restype = None
        lib.kyb_lane_task.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.kyb_lane_task.restype = ctypes.c_int
        lib.kyb_lane_taken.argtypes = [ctypes.c_void_p]
        lib.kyb_lane_taken.restype = ctypes.c_uint64
        lib.kyb_lane_close.argtypes = [ctypes.c_void_p]
        lib.kyb_lane_close.restype = None
        _loaded[path] = lib
    return lib


class Lane:
    """One lane per pod daemon, over a connection of its own to the runc shim."""

    def __init__(self, lib: ctypes.CDLL, handle: int) -> None:
        self._lib = lib
        self._handle: int | None = handle
        self._gate = (True, True, True)

    @classmethod
    def open(cls, child_address: str, child_service: str, events_address: str = "") -> Lane | None:
        """A lane to the runc shim at `child_address` and to containerd's events service at `events_address`
        (none if empty: events then pass through Python), or None (no library, switched off, or it failed:
        logged; the daemon then serves every call in Python)."""
        switch = os.environ.get(SWITCH_ENV, "")
        if switch == "off":
            return None
        try:
            lib = load(switch or LIBRARY)
        except OSError as err:
            log.warning("pass lane not loaded; every call goes through Python", extra={"fields": {"error": str(err)}})
            return None
        if lib is None:
            return None
        sockets: list[socket.socket] = []
        try:
            for address in (child_address, events_address):
                if address:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sockets.append(sock)
                    sock.connect(socket_path(address))
        except OSError as err:
            for sock in sockets:
                sock.close()
            log.warning("pass lane cannot connect; every call goes through Python",
                        extra={"fields": {"error": str(err)}})
            return None
        events_fd = sockets[1].detach() if events_address else -1
        handle = lib.kyb_lane_new(sockets[0].detach(), child_service.encode(), events_fd)  # the lane's, either way
        if not handle:
            log.warning("pass lane not started; every call goes through Python",
                        extra={"fields": {"error": os.strerror(ctypes.get_errno())}})
            return None
        return cls(lib, handle)

    def adopt(self, sock: socket.socket) -> socket.socket:
        """The socket Python serves for the containerd connection `sock`; `sock` itself if the lane cannot
        take it (then Python serves it directly, as without a lane)."""
        if self._handle is None:
            return sock
        fd = self._lib.kyb_lane_adopt(self._handle, sock.fileno())
        if fd < 0:
            log.warning("pass lane did not take a connection; Python serves it",
                        extra={"fields": {"error": os.strerror(ctypes.get_errno())}})
            return sock
        sock.detach()
        return socket.socket(fileno=fd)

    def gate(self, *, open_: bool, connect_local: bool, events_open: bool) -> None:
        """open_: no task is hibernated; connect_local: no task has GPU state; events_open: no task is
        hibernating or waking, so events pass untouched (see passlane.c)."""
        if self._handle is not None and (open_, connect_local, events_open) != self._gate:
            self._gate = (open_, connect_local, events_open)
            self._lib.kyb_lane_gate(self._handle, int(open_), int(connect_local), int(events_open))

    def task(self, container_id: str, *, pid: int, plain: bool) -> None:
        """What the lane may do for a task: answer Connect with `pid` (0: unknown), pass its Start (plain).
        pid 0 and not plain forgets it. A task the lane cannot hold is left to Python."""
        if self._handle is not None:
            self._lib.kyb_lane_task(self._handle, container_id.encode(), pid, int(plain))

    @property
    def taken(self) -> int:
        """Calls the lane answered or passed on without Python."""
        return 0 if self._handle is None else int(self._lib.kyb_lane_taken(self._handle))

    def close(self) -> None:
        if self._handle is not None:
            self._lib.kyb_lane_close(self._handle)
            self._handle = None
