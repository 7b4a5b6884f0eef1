"""Command line of containerd-shim-kybernate-v1, shaped like containerd's own shims.

containerd runs the binary as `<flags> start`, `<flags> delete`, `-info` or `-v`, reads stdout (and for
`start` stderr too) as the answer, and nothing else may appear there. Errors go to stderr with exit
status 1 so containerd shows them in its own error message.

This module imports only the standard library: `start` is on the container start path and every
millisecond of import time is paid per container.
"""

from __future__ import annotations

import sys

from . import __version__

# Go's flag package accepts -flag value, -flag=value and --flag; these take a value, the rest are booleans.
_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "debug-socket"}
_BOOL_FLAGS = {"debug", "v", "info"}


class UsageError(Exception):
    """The command line is not one containerd would send."""


class ShimArgs:
    """The parsed command line. A plain class: `dataclasses` alone costs ~7 ms of import per start."""

    __slots__ = ("namespace", "address", "publish_binary", "id", "bundle", "debug", "version", "info", "action")

    def __init__(
        self,
        namespace: str = "",
        address: str = "",
        publish_binary: str = "",
        id: str = "",  # noqa: A002 - containerd's flag name
        bundle: str = "",
        debug: bool = False,
        version: bool = False,
        info: bool = False,
        action: str = "",
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle
        self.debug = debug
        self.version = version
        self.info = info
        self.action = action

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShimArgs) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "ShimArgs(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def child_flags(self) -> list[str]:
        """The flags to hand on to the runc shim, in the order containerd itself writes them."""
        flags = ["-namespace", self.namespace, "-address", self.address]
        if self.publish_binary:
            flags += ["-publish-binary", self.publish_binary]
        flags += ["-id", self.id]
        if self.bundle:
            flags += ["-bundle", self.bundle]
        if self.debug:
            flags.append("-debug")
        return flags


def parse_args(argv: list[str]) -> ShimArgs:
    values: dict[str, str] = {}
    switches: set[str] = set()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            rest = argv[i + 1 :] if arg == "--" else argv[i:]
            break
        name, eq, inline = arg.lstrip("-").partition("=")
        if name in _VALUE_FLAGS:
            if eq:
                values[name] = inline
            elif i + 1 < len(argv):
                i += 1
                values[name] = argv[i]
            else:
                raise UsageError(f"flag -{name} needs a value")
        elif name in _BOOL_FLAGS:
            if eq and inline.lower() in ("false", "0"):
                switches.discard(name)
            else:
                switches.add(name)
        else:
            raise UsageError(f"unknown flag -{name}")
        i += 1
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments after {rest[0]!r}: {rest[1:]}")
    return ShimArgs(
        namespace=values.get("namespace", ""),
        address=values.get("address", ""),
        publish_binary=values.get("publish-binary", ""),
        id=values.get("id", ""),
        bundle=values.get("bundle", ""),
        debug="debug" in switches,
        version="v" in switches,
        info="info" in switches,
        action=rest[0] if rest else "",
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.version:
            sys.stdout.write(f"containerd-shim-kybernate-v1:\n  Version:  {__version__}\n")
            return 0
        from . import manager  # imported here so -v stays instant

        if args.info:
            sys.stdout.buffer.write(manager.info(args, sys.stdin.buffer.read()))
            return 0
        if not args.namespace:
            raise UsageError("shim namespace cannot be empty (-namespace)")
        if args.action == "start":
            address = manager.start(args, sys.stdin.buffer.read())
            sys.stdout.write(address)
            return 0
        if args.action == "delete":
            sys.stdout.buffer.write(manager.delete(args))
            return 0
        raise UsageError(f"unknown action {args.action!r}: expected start or delete")
    except UsageError as err:
        sys.stderr.write(f"containerd-shim-kybernate-v1: {err}\n")
        return 2
    except Exception as err:  # noqa: BLE001 - the top of a CLI: say what failed, never a traceback on stdout
        sys.stderr.write(f"containerd-shim-kybernate-v1 {args.action or ''}: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
