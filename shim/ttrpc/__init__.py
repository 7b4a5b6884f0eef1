"""ttrpc (containerd's RPC protocol over unix sockets), implemented for asyncio."""

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
