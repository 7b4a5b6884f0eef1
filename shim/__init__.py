"""containerd-shim-kybernate-v1: a shim v2 runtime that wraps the stock runc shim."""

__version__ = "0.1.0"
