"""Unix sockets for tests of our ttrpc peers: a short directory for them and a server listening on one."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from kybernate.shim.ttrpc.server import Server


@contextmanager
def short_dir(prefix: str) -> Iterator[str]:
    """A new directory under /tmp: a unix socket's path must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def serve(server: Server, path: str) -> asyncio.Task[None]:
    """`server` on a new socket at `path`, listening before this returns."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    return asyncio.create_task(server.serve_socket(listener))
