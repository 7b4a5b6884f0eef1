"""ttrpc (containerd's RPC protocol over unix sockets), implemented for asyncio."""
