"""Real program patterns for the checkpoint corpus: each one runs a deterministic chain through its machinery.

Run inside a container as `python3 -S /corpus/patterns.py PATTERN /out` (the host's python through
read-only bind mounts). Every step i gets the item `work(i)` through the pattern's machinery (worker
processes, shared memory, sockets, ...), folds it into a running hash, and appends `i state` to
/out/seq, a file held open in append mode the whole time. A fresh start writes one `start` line first.
tests/integration/test_real_programs.py computes the same chain without any machinery (`reference`)
and compares every line: a restore that lost state, restarted, or skipped shows as a wrong line.
No torch here: the DataLoader patterns model what its workers do with multiprocessing's queues.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

STEP_S = 0.02
WORKERS = 2
EPOCH = 40  # items per epoch for loaders without persistent workers
TCP_PORT = 7070


def work(i: int) -> bytes:
    """The item of step i: what a worker, a peer process or a thread hands back to the main loop."""
    return hashlib.sha256(f"item-{i}".encode()).digest()[:16]


def fold(state: bytes, i: int, item: bytes) -> bytes:
    return hashlib.sha256(state + i.to_bytes(8, "little") + item).digest()


def reference(steps: int) -> list[str]:
    """The line each step must write, computed without any of the machinery."""
    state, lines = b"", []
    for i in range(steps):
        state = fold(state, i, work(i))
        lines.append(f"{i} {state.hex()[:16]}")
    return lines


# --- DataLoader-like worker pools: index queues per worker, one result queue, a pin-memory thread ---------


def _loader_worker(worker: int, start: int, index_queue, result_queue) -> None:  # type: ignore[no-untyped-def]
    served = 0  # what a worker has served so far (its own state): checked by the main loop
    while True:
        j = index_queue.get()
        if j is None:
            return
        result_queue.put((j, worker, served, work(start + j)))
        served += 1


def loader(method: str, *, pin_memory: bool = True, persistent: bool = True) -> Iterator[bytes]:
    """Persistent workers serve forever; otherwise each epoch of EPOCH items starts and joins new ones."""
    import multiprocessing as mp

    ctx = mp.get_context(method)
    start = 0
    while True:
        count = None if persistent else EPOCH
        yield from _epoch(ctx, start, count, pin_memory)
        start += EPOCH


def _epoch(ctx, start: int, count: int | None, pin_memory: bool) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    result_queue = ctx.Queue()
    index_queues = [ctx.Queue() for _ in range(WORKERS)]
    workers = [ctx.Process(target=_loader_worker, args=(w, start, index_queues[w], result_queue), daemon=True,
                           name=f"loader_worker_{w}") for w in range(WORKERS)]
    for p in workers:
        p.start()
    results = result_queue
    if pin_memory:
        results = queue.Queue(maxsize=4)

        def pin() -> None:  # like torch's pin_memory thread: moves results off the worker queue
            while True:
                results.put(result_queue.get())

        threading.Thread(target=pin, daemon=True, name="pin_memory").start()
    end = start + count if count is not None else None
    prefetch = 2 * WORKERS

    def ask(k: int) -> None:
        if end is None or k < end:
            index_queues[(k - start) % WORKERS].put(k - start)

    for k in range(start, start + prefetch):
        ask(k)
    waiting: dict[int, bytes] = {}
    i = start
    while end is None or i < end:
        while i not in waiting:
            j, worker, served, item = results.get()
            if worker != j % WORKERS or served != j // WORKERS:
                raise SystemExit(f"worker {worker} lost its state: item {j} served as number {served}")
            waiting[start + j] = item
        ask(i + prefetch)
        yield waiting.pop(i)
        i += 1
    for q in index_queues:
        q.put(None)
    for p in workers:
        p.join()


def _pool_item(i: int) -> bytes:
    return work(i)


def mp_pool() -> Iterator[bytes]:
    import multiprocessing as mp

    with mp.get_context("fork").Pool(WORKERS) as pool:
        i = 0
        while True:
            yield from pool.map(_pool_item, [i, i + 1])
            i += 2


def process_pool_executor() -> Iterator[bytes]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn")) as pool:
        i = 0
        while True:
            futures = [pool.submit(_pool_item, k) for k in (i, i + 1)]
            for f in futures:
                yield f.result()
            i += 2


# --- threads blocked in system calls --------------------------------------------------------------------


def blocked_threads() -> Iterator[bytes]:
    """A thread blocked in read(2) on a pipe does the work; others sit in sleep, accept, futex and select."""
    req_r, req_w = os.pipe()
    res_r, res_w = os.pipe()

    def reader() -> None:
        while True:
            i = struct.unpack("<Q", os.read(req_r, 8))[0]
            os.write(res_w, work(i))

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0kybernate-corpus-blocked")
    listener.listen()
    never = threading.Event()
    idle_r, _idle_w = os.pipe()
    for target in (reader, lambda: time.sleep(10**6), listener.accept, never.wait,
                   lambda: select.select([idle_r], [], [])):
        threading.Thread(target=target, daemon=True).start()
    i = 0
    while True:
        os.write(req_w, struct.pack("<Q", i))
        yield _read_exact(res_r, 16)
        i += 1


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise SystemExit("peer closed")
        data += chunk
    return data


# --- POSIX shared memory and semaphores in /dev/shm, between two processes -------------------------------


def _shm_peer(name: str, ready, done) -> None:  # type: ignore[no-untyped-def]
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    while True:
        ready.acquire()
        i = struct.unpack_from("<Q", shm.buf, 0)[0]
        shm.buf[8:24] = work(i)
        done.release()


def posix_shm() -> Iterator[bytes]:
    import multiprocessing as mp
    from multiprocessing import shared_memory

    ctx = mp.get_context("fork")
    shm = shared_memory.SharedMemory(create=True, size=4096)
    ready, done = ctx.Semaphore(0), ctx.Semaphore(0)  # sem_open + sem_unlink: mapped, unlinked
    ctx.Process(target=_shm_peer, args=(shm.name, ready, done), daemon=True).start()
    i = 0
    while True:
        struct.pack_into("<Q", shm.buf, 0, i)
        ready.release()
        done.acquire()
        yield bytes(shm.buf[8:24])
        i += 1


# --- memfd shared with a forked child --------------------------------------------------------------------


def memfd() -> Iterator[bytes]:
    fd = os.memfd_create("kybernate-corpus")
    os.ftruncate(fd, 4096)
    mem = mmap.mmap(fd, 4096)
    req_r, req_w = os.pipe()
    res_r, res_w = os.pipe()
    if os.fork() == 0:
        while True:
            _read_exact(req_r, 1)
            i = struct.unpack_from("<Q", mem, 0)[0]
            mem[8:24] = work(i)
            os.write(res_w, b"!")
    i = 0
    while True:
        struct.pack_into("<Q", mem, 0, i)
        os.write(req_w, b"?")
        _read_exact(res_r, 1)
        yield bytes(mem[8:24])
        i += 1


# --- eventfd + epoll between the main loop and a worker thread -------------------------------------------


def eventfd_epoll() -> Iterator[bytes]:
    ask, answer = os.eventfd(0), os.eventfd(0)
    box: list[bytes] = [b""]

    def worker() -> None:
        ep = select.epoll()
        ep.register(ask, select.EPOLLIN)
        while True:
            ep.poll()
            i = os.eventfd_read(ask) - 1
            box[0] = work(i)
            os.eventfd_write(answer, 1)

    threading.Thread(target=worker, daemon=True).start()
    ep = select.epoll()
    ep.register(answer, select.EPOLLIN)
    i = 0
    while True:
        os.eventfd_write(ask, i + 1)
        ep.poll()
        os.eventfd_read(answer)
        yield box[0]
        i += 1


# --- a unix socket pair between two processes ------------------------------------------------------------


def socketpair() -> Iterator[bytes]:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        here.close()
        while True:
            i = struct.unpack("<Q", there.recv(8))[0]
            there.send(work(i))
    there.close()
    i = 0
    while True:
        here.send(struct.pack("<Q", i))
        yield here.recv(16)
        i += 1


# --- a file in the container's rootfs, rewritten in place through an open descriptor ---------------------


def open_file() -> Iterator[bytes]:
    """The item goes through a 64-byte file written and read back at offsets (its size never changes)."""
    fd = os.open("/tmp/corpus-state.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, bytes(64), 0)
    i = 0
    while True:
        os.pwrite(fd, work(i), 16 * (i % 3))
        yield os.pread(fd, 16, 16 * (i % 3))
        i += 1


# --- a log in the container's rootfs written through a plain read-write descriptor (it grows) -------------


def growing_file() -> Iterator[bytes]:
    """Not O_APPEND: CRIU records the file's size and a restore refuses a file that has grown since."""
    fd = os.open("/tmp/corpus-growing.log", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    i = 0
    while True:
        os.write(fd, work(i).hex().encode() + b"\n")
        yield work(i)
        i += 1


# --- inotify watch on a directory ------------------------------------------------------------------------


def inotify() -> Iterator[bytes]:
    libc = ctypes.CDLL(None, use_errno=True)
    directory = "/tmp/corpus-watched"
    os.makedirs(directory, exist_ok=True)
    fd = libc.inotify_init1(0)
    if fd < 0 or libc.inotify_add_watch(fd, directory.encode(), 0x100) < 0:  # IN_CREATE
        raise SystemExit(f"inotify: errno {ctypes.get_errno()}")
    i = 0
    while True:
        name = work(i).hex()
        os.close(os.open(os.path.join(directory, name), os.O_CREAT | os.O_WRONLY, 0o600))
        event = os.read(fd, 4096)
        _wd, _mask, _cookie, length = struct.unpack_from("iIII", event, 0)
        seen = event[16:16 + length].rstrip(b"\0").decode()
        os.unlink(os.path.join(directory, name))
        yield bytes.fromhex(seen)
        i += 1


# --- a TCP server listening with no connection open ------------------------------------------------------


def tcp_listen() -> Iterator[bytes]:
    """A thread serves 127.0.0.1:7070 (answers the current step); the test connects only while not dumping."""
    current = [0]
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", TCP_PORT))
    server.listen()

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(f"step {current[0]}\n".encode())

    threading.Thread(target=serve, daemon=True).start()
    i = 0
    while True:
        current[0] = i
        yield work(i)
        i += 1


# --- an established TCP connection inside the container (CRIU refuses it without tcp-established) ---------


def tcp_established() -> Iterator[bytes]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", TCP_PORT + 1))
    server.listen()
    client = socket.create_connection(("127.0.0.1", TCP_PORT + 1))
    peer, _ = server.accept()

    def answer() -> None:
        while True:
            i = struct.unpack("<Q", _recv_exact(peer, 8))[0]
            peer.sendall(work(i))

    threading.Thread(target=answer, daemon=True).start()
    i = 0
    while True:
        client.sendall(struct.pack("<Q", i))
        yield _recv_exact(client, 16)
        i += 1


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SystemExit("peer closed")
        data += chunk
    return data


PATTERNS: dict[str, Callable[[], Iterator[bytes]]] = {
    "loader-fork": lambda: loader("fork"),
    "loader-spawn": lambda: loader("spawn"),
    "loader-forkserver": lambda: loader("forkserver"),
    "loader-fork-epochs": lambda: loader("fork", pin_memory=False, persistent=False),
    "loader-spawn-epochs": lambda: loader("spawn", pin_memory=False, persistent=False),
    "mp-pool": mp_pool,
    "process-pool-executor": process_pool_executor,
    "blocked-threads": blocked_threads,
    "posix-shm": posix_shm,
    "memfd": memfd,
    "eventfd-epoll": eventfd_epoll,
    "socketpair": socketpair,
    "open-file": open_file,
    "inotify": inotify,
    "tcp-listen": tcp_listen,
    "tcp-established": tcp_established,
    "growing-file": growing_file,
}


def main(pattern: str, out_dir: str) -> None:
    items = PATTERNS[pattern]()
    with open(os.path.join(out_dir, "seq"), "a", buffering=1) as out:  # O_APPEND: CRIU skips the size check
        out.write("start\n")
        state = b""
        for i, item in enumerate(items):
            if item != work(i):
                out.write(f"{i} wrong item {item.hex()}\n")
                raise SystemExit(1)
            state = fold(state, i, item)
            out.write(f"{i} {state.hex()[:16]}\n")
            time.sleep(STEP_S)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
