"""ttrpc (containerd's RPC protocol over unix sockets), implemented for asyncio.

The names below load on first use, so that `kybernate.shim.ttrpc.address` (the shim's start path)
imports without asyncio and protobuf.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client
    from .errors import Code, ConnectionClosed, ProtocolError, TTRPCError
    from .protocol import Request, Response
    from .server import Call, Handler, Server

__all__ = [
    "Call",
    "Client",
    "Code",
    "ConnectionClosed",
    "Handler",
    "ProtocolError",
    "Request",
    "Response",
    "Server",
    "TTRPCError",
]

_WHERE = {"Client": "client", "Code": "errors", "ConnectionClosed": "errors", "ProtocolError": "errors",
          "TTRPCError": "errors", "Request": "protocol", "Response": "protocol", "Call": "server",
          "Handler": "server", "Server": "server"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
