"""containerd's shim addresses ("unix:///path") as socket paths. Standard library only: the shim's start
and delete paths use it without loading the asyncio side of this package."""

from __future__ import annotations


def socket_path(address: str) -> str:
    """A filesystem path from "unix:///x" or "/x"."""
    return address.removeprefix("unix://")
