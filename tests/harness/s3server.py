"""A real S3-compatible server for the tests, on 127.0.0.1: moto's standalone server (`moto_server`).

The issue asked for `rclone serve s3` from Debian sid; sid's rclone (1.75.2, checked 2026-11-29) is
built without `serve s3` (its S3 server library is not packaged in Debian; `rclone serve` offers dlna,
docker, http, restic, sftp, webdav only), and no other S3 server is packaged there short of Ceph's
radosgw. moto's server is a separate process speaking the S3 REST protocol over HTTP (SigV4, multipart,
per-part checksums): the client under test goes through its real HTTP stack. Objects live in the
server's memory, so tests keep objects small.

Each server has a random free port, its own log and random credentials; `env()` is what a client of it
needs (the store's KYBERNATE_S3_* and the standard AWS variables). Readiness is waited on by connecting.
"""

from __future__ import annotations

import os
import secrets
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
    def __init__(self, workdir: Path, bucket: str = "kybernate") -> None:
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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
