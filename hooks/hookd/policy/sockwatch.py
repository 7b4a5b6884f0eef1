"""Pending connections on a pod's listening TCP sockets, through sock_diag (inet_diag) over netlink.

A frozen container's listening sockets still complete handshakes: the kernel queues the connections in the
socket's accept queue until the process accepts them. inet_diag reports that queue's length as `rqueue` of
each LISTEN socket; a nonzero one means a client is waiting, and hookd wakes the container (the client sees a
delay, never a refused connection). The dump must be made from the pod's network namespace: the netlink
socket is opened there (setns in a short-lived thread of its own, so no thread of hookd's stays in a pod's
namespace) and keeps belonging to it afterwards.

A small raw implementation rather than pyroute2: one request and one fixed-size reply per socket, and a
socket per pod namespace held open while the pod is parked (pyroute2's namespace support runs a helper
process per namespace). Blocking: call `listeners` through a thread.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
CLONE_NEWNET = 0x40000000
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (48 bytes, all zero: any socket).
_REQ = struct.Struct("=BBBxI48x")
# inet_diag_msg: family, state, timer, retrans; sockid (sport, dport big-endian, src, dst, if, cookie);
# expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB2H16s16sI8sIIIII")
MAX_REPLY_BYTES = 1 << 20  # a dump of listeners; far more than any pod has


class SockDiagError(OSError):
    """The namespace cannot be entered or the kernel refused the dump; the message says which."""


@dataclass(frozen=True, slots=True)
class Listener:
    family: int  # AF_INET or AF_INET6
    port: int
    pending: int  # connections in the accept queue, not yet accepted
    inode: int  # the socket's inode: which process holds it (/proc/<pid>/fd -> socket:[inode])


class NetnsDiag:
    """A sock_diag netlink socket in the network namespace of `pid` (opened at construction)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._sock = _open_in_netns(pid)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def listeners(self) -> list[Listener]:
        """Every listening TCP socket of the namespace, IPv4 and IPv6, with its accept-queue length."""
        return self._dump(socket.AF_INET) + self._dump(socket.AF_INET6)

    def pending(self) -> int:
        return sum(listener.pending for listener in self.listeners())

    def _dump(self, family: int) -> list[Listener]:
        self._seq += 1
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                                self._seq, 0)
        self._sock.send(header + body)
        out: list[Listener] = []
        received = 0
        while True:
            data = self._sock.recv(65536)
            received += len(data)
            if not data or received > MAX_REPLY_BYTES:
                raise SockDiagError(f"sock_diag dump of pid {self.pid}'s namespace ended early or is too large")
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise SockDiagError("sock_diag: malformed netlink message")
                payload = offset + _NLMSGHDR.size
                if seq != self._seq:
                    pass  # a late answer to an earlier dump: skip
                elif kind == NLMSG_DONE:
                    return out
                elif kind == NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", data, payload)[0]
                    raise SockDiagError(errno, f"sock_diag dump refused: {os.strerror(errno)}")
                elif kind == SOCK_DIAG_BY_FAMILY and payload + _MSG.size <= len(data):
                    fields = _MSG.unpack_from(data, payload)
                    if fields[1] == TCP_LISTEN:
                        out.append(Listener(family=fields[0], port=socket.ntohs(fields[4]), pending=fields[11],
                                            inode=fields[14]))
                offset += (length + 3) & ~3


def _open_in_netns(pid: int) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket created inside pid's network namespace, by a thread that then ends."""
    result: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise SockDiagError(err, f"cannot enter the network namespace of pid {pid}: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
            sock.settimeout(5.0)
            result.append(sock)
        except BaseException as err:  # handed to the caller's thread
            result.append(err)

    # The thread ends right after: its changed namespace dies with it, nothing of hookd stays in the pod's.
    thread = threading.Thread(target=enter_and_open, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if not result:
        raise SockDiagError(f"cannot open sock_diag in the network namespace of pid {pid}")
    outcome = result[0]
    if isinstance(outcome, BaseException):
        if isinstance(outcome, OSError):
            raise SockDiagError(outcome.errno, f"pid {pid}'s network namespace: {outcome.strerror or outcome}")
        raise outcome
    return outcome
