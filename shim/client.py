"""The shim binary's Python client: hand the command to the resident kybernate-shimd, or run it here.

containerd runs `containerd-shim-kybernate-v1` for every `start`, `delete` and `-info`. Starting Python and
importing the shim costs far more than the work itself, so a resident process (shim/resident.py) keeps
everything imported and forks a worker per command. Where a C compiler was at hand, the binary is the
native client (shim/native/shim_client.c), which speaks the same protocol, answers a pod's later `start`s
and most `delete`s itself, and runs this file (installed beside it as `<binary>.py`) only when no resident
listens. Without the native client, this file is the binary. Either way this client passes
its own stdin, stdout and stderr (SCM_RIGHTS), its argv, cwd and environment over the resident's socket
and exits with the status the worker sends back. The worker writes the answer straight into containerd's
pipes, so nothing is copied.

When no resident process answers, the command runs here exactly as before (shim/cli.py), and the first
such fallback after the resident went away says so once in the shim's log.

Only built-in and C modules here (posix, _socket): no protobuf, no asyncio, no `socket`/`enum`.
Wire format, client to resident, one stream: an 8-byte big-endian length, then netstring-like fields
`<len>:<bytes>,` in order: protocol version (`1`), cwd, argc, argv..., then `KEY=VALUE` environment
entries; fds 0, 1, 2 ride on the first sendmsg. Resident to client: `<status>\\n`, then close.
"""

from __future__ import annotations

import _socket
import os
import sys

SOCKET_ENV = "KYBERNATE_RESIDENT_SOCKET"
# Its own directory (packaging/systemd/kybernate-shimd.service): hookd's /run/kybernate goes when hookd stops.
DEFAULT_SOCKET = "/run/kybernate-shimd/shimd.sock"
PROTOCOL = b"1"
# Marks that a fallback was already logged since the resident process last started (it removes it).
FALLBACK_MARK_SUFFIX = ".fallback-logged"
# How long to wait for the worker's status: containerd's own shim start timeout is far below.
ANSWER_TIMEOUT_S = 60.0
MAX_REQUEST = 1 << 20


def resident_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def encode(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    fields = [PROTOCOL, os.fsencode(cwd), str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    body = b"".join(b"%d:%s," % (len(f), f) for f in fields)
    return len(body).to_bytes(8, "big") + body


def decode(body: bytes) -> tuple[list[str], str, dict[str, str]]:
    """Inverse of encode (without the length prefix); ValueError on anything malformed."""
    fields: list[bytes] = []
    i = 0
    while i < len(body):
        colon = body.index(b":", i)
        size = int(body[i:colon])
        end = colon + 1 + size
        if size < 0 or body[end : end + 1] != b",":
            raise ValueError("malformed field")
        fields.append(body[colon + 1 : end])
        i = end + 1
    if len(fields) < 3 or fields[0] != PROTOCOL:
        raise ValueError(f"unknown request (protocol {fields[0] if fields else b''!r})")
    argc = int(fields[2])
    if argc < 1 or 3 + argc > len(fields):
        raise ValueError("bad argc")
    argv = [os.fsdecode(f) for f in fields[3 : 3 + argc]]
    env = {}
    for entry in fields[3 + argc :]:
        key, eq, value = entry.partition(b"=")
        if not eq:
            raise ValueError("bad environment entry")
        env[os.fsdecode(key)] = os.fsdecode(value)
    return argv, os.fsdecode(fields[1]), env


def ask_resident(path: str, argv: list[str]) -> int | None:
    """The worker's exit status, or None when no resident process listens (then nothing happened)."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            conn.connect(path)
        except OSError:
            return None
        request = encode(argv, os.getcwd(), dict(os.environ))
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        sent = conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(request):
            conn.sendall(request[sent:])
        conn.settimeout(ANSWER_TIMEOUT_S)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                break
            answer += chunk
    finally:
        conn.close()
    if not answer.endswith(b"\n"):
        # The worker died mid-command: what it did is unknown, so say so rather than run it twice.
        os.write(2, b"containerd-shim-kybernate-v1: the kybernate-shimd worker died before answering\n")
        return 1
    return int(answer)


def note_fallback_once(path: str, argv: list[str]) -> None:
    """One line in the shim's log (containerd copies it into its own) per absence of the resident."""
    try:
        fd = os.open(path + FALLBACK_MARK_SUFFIX, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return  # logged before (or the directory is missing: then there is no resident to speak of)
    os.close(fd)
    bundle = argv[argv.index("-bundle") + 1] if "-bundle" in argv[:-1] else os.getcwd()
    line = (f"level=warning logger=kybernate.shim.client msg=\"kybernate-shimd is not running: starting shims "
            f"without it (slower) until it is back\" runtime=io.containerd.kybernate.v1 socket={path}\n")
    try:
        log = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(log, line.encode())
    except OSError:
        pass
    finally:
        os.close(log)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv if argv is None else argv
    path = resident_socket()
    if path != "off":
        status = ask_resident(path, args)
        if status is not None:
            return status
        note_fallback_once(path, args[1:])
    if not __package__:
        # Run as the launcher (`python -IS`): load site-packages now, and show the shim's command line
        # rather than the interpreter's (the pod daemon `start` forks inherits it).
        import site

        site.main()
        from kybernate.shim import title

        # Run by the native client as `<binary>.py`: show the binary's name, which is how shims are found.
        title.set_title([args[0].removesuffix(".py"), *args[1:]])
    from kybernate.shim.cli import main as run_here

    return run_here(args[1:])


def write_launcher(target: str) -> None:
    """Write this module as an executable that runs without site-packages (`python -IS`).

    Interpreter start with site-packages costs tens of milliseconds per command (every .pth file runs);
    this file needs none of it. containerd runs the result as containerd-shim-kybernate-v1.
    """
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    header = (f"#!{sys.executable} -IS\n"
              "# Written by `python -m kybernate.shim.client --write-launcher PATH` from shim/client.py.\n")
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header + source)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-launcher":
        write_launcher(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
