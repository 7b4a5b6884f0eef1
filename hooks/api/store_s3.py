"""The store's S3 tier: `s3://<bucket>/<prefix><key>/<generation>/<path>`, the same layout as on disk.

Upload: every file of a complete local generation, in multipart parts of the manifest's `part_size`
(64 MiB), several files and several parts in parallel, each part sent with the manifest's own SHA256 of it as
its checksum (a server that checks checksums refuses bytes that differ from what was checkpointed, and the
object's composite SHA256 is the manifest's sha256 of the file); then `manifest.json`, LAST. A generation
exists remotely only once its manifest does: readers list and open manifests only, so an interrupted upload
is never mistaken for a checkpoint. Retention (retain, delete): a marker, then the manifest, then the rest.

Download: into a temp dir of the local store (hooks/api/store.py), every file checked for size and
sha256 against the manifest before the generation is renamed into place under its own number; a
mismatch removes the temp dir and names the file. Nothing downloaded is handed on unverified.

Configuration (environment; docs/store.md "S3 tier"): KYBERNATE_S3_BUCKET (the tier is off without it),
KYBERNATE_S3_ENDPOINT (any S3-compatible endpoint; default the client's AWS endpoint), KYBERNATE_S3_PREFIX,
KYBERNATE_S3_REGION. Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/..., AWS_PROFILE,
~/.aws/credentials, AWS_SHARED_CREDENTIALS_FILE for a mounted Secret file).

boto3 is imported on the first call only (the shim imports this module only for a restore from the store
whose generation is not local); chosen by measurement (docs/benchmarks.md, tests/bench/bench_store.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .store import (
    MANIFEST,
    BadKey,
    Corrupt,
    FileEntry,
    Generation,
    Manifest,
    NotFound,
    Store,
    StoreError,
    validate_key,
    verify_files,
)

BUCKET_ENV = "KYBERNATE_S3_BUCKET"
ENDPOINT_ENV = "KYBERNATE_S3_ENDPOINT"
PREFIX_ENV = "KYBERNATE_S3_PREFIX"
REGION_ENV = "KYBERNATE_S3_REGION"
# Files in flight at once, and parts in flight per file: bounded, whatever the generation holds.
FILE_CONCURRENCY = 4
PART_CONCURRENCY = 8
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
RETRIES = 3
# The object that marks a remote generation as being deleted (written before its manifest is removed).
DELETING = ".deleting"


def _error_code(err: Exception) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchUpload", ...), "" for anything else."""
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _b64(hex_digest: str) -> str:
    """A manifest's hex sha256 as S3's checksum header wants it (base64 of the raw digest)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class S3Error(StoreError):
    """The S3 tier failed (unreachable, refused, missing); the message names the object and the endpoint."""


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    endpoint: str = ""
    prefix: str = ""
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Config | None:
        """The configured tier, or None when KYBERNATE_S3_BUCKET is unset (the tier is off)."""
        env = dict(os.environ) if env is None else env
        bucket = env.get(BUCKET_ENV, "")
        if not bucket:
            return None
        prefix = env.get(PREFIX_ENV, "").strip("/")
        return cls(bucket, env.get(ENDPOINT_ENV, ""), prefix + "/" if prefix else "",
                   env.get(REGION_ENV) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")

    def object_key(self, key: str, generation: int, path: str) -> str:
        return f"{self.prefix}{validate_key(key)}/{generation}/{path}"


Progress = Callable[[int], None]  # bytes just transferred


class S3Tier:
    def __init__(self, config: S3Config, *, file_concurrency: int = FILE_CONCURRENCY,
                 part_concurrency: int = PART_CONCURRENCY) -> None:
        import boto3
        from botocore.config import Config

        if file_concurrency < 1 or part_concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (files {file_concurrency}, parts {part_concurrency})")
        self.config = config
        self.file_concurrency = file_concurrency
        self.part_concurrency = part_concurrency
        # Checksums only where asked (per part, SHA256 below): some S3-compatible servers refuse the
        # client's default trailing CRC32.
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=config.endpoint or None, region_name=config.region,
            config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                          retries={"max_attempts": RETRIES, "mode": "standard"},
                          max_pool_connections=file_concurrency * part_concurrency + 4,
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          # Every body we send carries its SHA256 checksum (the manifest's, in a signed
                          # header): signing the payload too would hash every byte once more (botocore does
                          # it over plain HTTP, and over HTTPS for bodies whose checksum it did not compute).
                          s3={"addressing_style": "path", "payload_signing_enabled": False}))

    def _transfer_config(self, part_size: int) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                              max_concurrency=self.part_concurrency, use_threads=True)

    def _fail(self, what: str, err: Exception) -> S3Error:
        return S3Error(f"{what} ({self.config.where}): {err}")

    # ---- upload ----

    def upload(self, generation: Generation, progress: Progress | None = None, *, resume: bool = False) -> int:
        """Every file, then manifest.json last; returns the bytes the generation holds. S3Error when anything
        fails (the generation then has no remote manifest: invisible remotely, the local copy untouched).

        Every object carries the file's manifest sha256 as metadata (`x-amz-meta-sha256`). With `resume` (a
        retry, or a restarted hookd) multipart uploads an earlier attempt left unfinished under the
        generation's prefix are aborted (their parts are restarted), and a file whose object is already
        there with the same size and sha256 metadata is not sent again (counted as done)."""
        m = generation.manifest
        done = progress or (lambda n: None)
        if resume:
            self._abort_unfinished(m.key, m.generation)

        def one(entry: FileEntry) -> None:
            name = self.config.object_key(m.key, m.generation, entry.path)
            if resume and self._present(name, entry):
                done(entry.size)
                return
            try:
                self._upload_file(os.path.join(generation.path, entry.path), name, entry, done)
            except S3Error:
                raise
            except Exception as err:  # botocore's errors have no common public base worth naming here
                raise self._fail(f"upload of {name} failed", err) from err

        with ThreadPoolExecutor(max_workers=self.file_concurrency) as pool:
            for future in [pool.submit(one, f) for f in m.files]:
                future.result()
        name = self.config.object_key(m.key, m.generation, MANIFEST)
        try:
            with open(os.path.join(generation.path, MANIFEST), "rb") as f:
                text = f.read()
            self.client.put_object(Bucket=self.config.bucket, Key=name, Body=text,
                                   ChecksumSHA256=base64.b64encode(hashlib.sha256(text).digest()).decode())
            done(len(text))
        except Exception as err:
            raise self._fail(f"upload of {name} failed", err) from err
        return m.size

    def _upload_file(self, path: str, name: str, entry: FileEntry, done: Progress) -> None:
        """One file, with the manifest's own SHA256 of each part as the part's checksum: the server checks the
        bytes it receives against the digests taken when the checkpoint was written (end to end, and the
        client hashes nothing again). A file of one part is one PUT; a larger one a multipart upload of
        `part_concurrency` parts at a time, aborted when anything fails."""
        bucket, meta = self.config.bucket, {"sha256": entry.sha256}
        if not entry.parts:
            with open(path, "rb") as f:
                self.client.put_object(Bucket=bucket, Key=name, Body=f, ChecksumSHA256=_b64(entry.sha256),
                                       Metadata=meta)
            done(entry.size)
            return
        upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=name, ChecksumAlgorithm="SHA256",
                                                        Metadata=meta)["UploadId"]
        try:
            def part(index: int) -> dict[str, Any]:
                with open(path, "rb") as f:
                    f.seek(index * entry.part_size)
                    body = f.read(entry.part_size)
                checksum = _b64(entry.parts[index])
                sent = self.client.upload_part(Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=index + 1,
                                               Body=body, ChecksumSHA256=checksum)
                done(len(body))
                return {"PartNumber": index + 1, "ETag": sent["ETag"], "ChecksumSHA256": checksum}

            with ThreadPoolExecutor(max_workers=self.part_concurrency) as pool:
                futures = [pool.submit(part, i) for i in range(len(entry.parts))]
                try:
                    parts = [future.result() for future in futures]
                except BaseException:
                    for future in futures:
                        future.cancel()  # the parts not started yet; those in flight end within one part
                    raise
            self.client.complete_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id)
            except Exception:  # noqa: S110 - the next attempt aborts what is left open under the generation
                pass
            raise

    def _present(self, name: str, entry: FileEntry) -> bool:
        """Whether the object is there already, complete: same size and the same sha256 metadata."""
        try:
            head = self.client.head_object(Bucket=self.config.bucket, Key=name)
        except Exception:  # missing (404) or unreadable: upload it
            return False
        # Metadata names are case-insensitive (HTTP headers): AWS answers `x-amz-meta-sha256`, rclone's
        # `serve s3` `X-Amz-Meta-Sha256`, which botocore hands on as written.
        metadata = {name.lower(): value for name, value in head.get("Metadata", {}).items()}
        return bool(head.get("ContentLength") == entry.size and metadata.get("sha256") == entry.sha256)

    def _abort_unfinished(self, key: str, generation: int) -> None:
        """Abort multipart uploads left open under key/generation (their parts cost storage and are redone)."""
        prefix = self.config.object_key(key, generation, "")
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.config.bucket,
                                                                               Prefix=prefix)
            for page in pages:
                for upload in page.get("Uploads", ()):
                    try:
                        self.client.abort_multipart_upload(Bucket=self.config.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                    except Exception as err:
                        if _error_code(err) != "NoSuchUpload":  # gone meanwhile: what aborting wants
                            raise
        except Exception as err:
            # Some S3-compatible servers (rclone's `serve s3`) answer the listing NoSuchUpload when they track
            # no multipart upload for the bucket: nothing is open, so nothing to abort.
            if _error_code(err) == "NoSuchUpload":
                return
            raise self._fail(f"cannot list or abort the unfinished uploads under {prefix}", err) from err

    # ---- listing ----

    def generations(self, key: str) -> list[int]:
        """Remote generations of `key` that have a manifest (complete), oldest first."""
        return sorted(number for number, names in self._listing(key).items() if MANIFEST in names)

    def _listing(self, key: str) -> dict[int, set[str]]:
        """Every numbered generation of `key` that has any object, with the names of its objects."""
        prefix = f"{self.config.prefix}{validate_key(key)}/"
        found: dict[int, set[str]] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.config.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    number, _, name = obj["Key"][len(prefix):].partition("/")
                    if name and number.isdigit() and number.isascii():
                        found.setdefault(int(number), set()).add(name)
        except Exception as err:
            raise self._fail(f"cannot list {prefix}", err) from err
        return found

    # ---- retention ----

    def retain(self, key: str, keep: int, busy: Collection[int] = ()) -> list[int]:
        """Retention on the S3 tier: of the generations S3 holds complete, only the newest `keep` (>= 1) stay.
        An older one goes only because S3 itself holds `keep` newer complete ones (a generation that exists
        only on a node's disk never pushes S3's last complete copies out). `busy` (being uploaded or restored
        by this node) are never touched. A deletion an earlier call left unfinished (its DELETING marker is
        there) is finished. Returns the generations deleted, oldest first."""
        if keep < 1:
            raise StoreError(f"keep must be at least 1 (got {keep}): the newest generation is never removed")
        listing = self._listing(key)
        complete = sorted(n for n, names in listing.items() if MANIFEST in names)
        unfinished = {n for n, names in listing.items() if DELETING in names}
        doomed = sorted((set(complete[:-keep]) | unfinished) - set(busy))
        for number in doomed:
            self.delete(key, number)
        return doomed

    def delete(self, key: str, generation: int) -> int:
        """Remove a remote generation; returns the objects removed. Its DELETING marker goes up first and its
        manifest is deleted next, so from then on no reader takes it for complete whatever happens after; then
        every other object under `<key>/<generation>/`, the marker last. A call cut short leaves the marker,
        and the next retain() finishes the deletion. S3Error names the object that could not be removed."""
        prefix = self.config.object_key(key, generation, "")
        present = self._listing(key).get(generation, set())
        try:
            self.client.put_object(Bucket=self.config.bucket, Key=prefix + DELETING, Body=b"")
        except Exception as err:
            raise self._fail(f"cannot mark {prefix} for deletion", err) from err
        files = sorted(present - {MANIFEST, DELETING})
        for name in [MANIFEST, *files, DELETING]:  # deleting an absent object succeeds: a retry is harmless
            try:
                self.client.delete_object(Bucket=self.config.bucket, Key=prefix + name)
            except Exception as err:
                raise self._fail(f"cannot delete {prefix + name}", err) from err
        return len(present - {DELETING})

    def keys(self) -> list[str]:
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=self.config.prefix, Delimiter="/")
            for page in pages:
                for common in page.get("CommonPrefixes", ()):
                    found.append(common["Prefix"][len(self.config.prefix):].rstrip("/"))
        except Exception as err:
            raise self._fail("cannot list keys", err) from err
        return sorted(found)

    def manifests(self) -> list[Manifest]:
        """The manifest of every complete remote generation of every key (what a registry rebuild indexes)."""
        found = []
        for key in self.keys():
            try:
                numbers = self.generations(key)
            except BadKey:
                continue  # not a key of ours (no store writes such a prefix)
            found += [self.manifest(key, number) for number in numbers]
        return found

    def manifest(self, key: str, generation: int) -> Manifest:
        return self._manifest(key, generation)[0]

    def _manifest(self, key: str, generation: int) -> tuple[Manifest, str]:
        """The remote manifest, parsed and checked, with its text (kept byte for byte in a download)."""
        name = self.config.object_key(key, generation, MANIFEST)
        try:
            body = self.client.get_object(Bucket=self.config.bucket, Key=name)["Body"].read()
        except Exception as err:
            raise self._fail(f"cannot read {name}", err) from err
        text = body.decode("utf-8", "replace")
        manifest = Manifest.from_json(text, f"s3://{self.config.bucket}/{name}")
        if manifest.key != key or manifest.generation != generation:
            raise Corrupt(f"{name} names {manifest.key!r}@{manifest.generation}, not {key!r}@{generation}", name)
        return manifest, text

    # ---- download ----

    def download(self, store: Store, key: str, generation: int | None = None,
                 progress: Progress | None = None) -> Generation:
        """The generation (newest remote when None) into the local store, verified; the local one when it
        is already there. NotFound when S3 has no complete copy; Corrupt names the first bad file."""
        have = self.generations(key)
        if not have:
            raise NotFound(f"no complete checkpoint for key {key!r} in {self.config.where}")
        number = have[-1] if generation is None else generation
        if number not in have:
            raise NotFound(f"key {key!r} has no complete generation {number} in {self.config.where} (have {have})")
        if number in store.generations(key):
            return store.open(key, number)
        # One download of a generation per node: restores of the same key at once (scale-out) wait for the
        # first one's download and then find the generation local.
        with store.lock(key):
            if number in store.generations(key):
                return store.open(key, number)
            return self._download(store, key, number, progress)

    def _download(self, store: Store, key: str, number: int, progress: Progress | None) -> Generation:
        manifest, text = self._manifest(key, number)
        pending = store.begin(key)
        done = progress or (lambda n: None)
        try:
            def one(entry_path: str, part_size: int) -> None:
                name = self.config.object_key(key, number, entry_path)
                target = os.path.join(pending.temp, entry_path)
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                try:
                    self.client.download_file(self.config.bucket, name, target, Callback=done,
                                              Config=self._transfer_config(part_size))
                except Exception as err:
                    raise self._fail(f"download of {name} failed", err) from err

            with ThreadPoolExecutor(max_workers=self.file_concurrency) as pool:
                for future in [pool.submit(one, f.path, f.part_size) for f in manifest.files]:
                    future.result()
            try:
                verify_files(pending.temp, manifest.files)
            except Corrupt as err:
                rel = os.path.relpath(err.path, pending.temp)
                raise Corrupt(f"{self.config.object_key(key, number, rel)} downloaded from {self.config.where}: "
                              f"{str(err).replace(pending.temp + '/', '')}", rel) from err
            return pending.commit_as(manifest, text)
        except BaseException:
            pending.abort()
            raise
