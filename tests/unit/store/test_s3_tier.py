"""The store's S3 tier against a real S3-compatible server (tests/harness/s3server.py): upload with the
manifest last, verified download into a fresh store, a damaged object refused naming the file, a
generation without its manifest invisible remotely; retention in S3 (manifest first, only what S3 holds,
queued uploads and downloads spared, a deletion cut short finished later)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from harness.s3server import S3Server

from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api import store_registry as sr
from kybernate.hooks.api.store_s3 import S3Config, S3Error, S3Tier

PART = 5 << 20  # the smallest part S3 takes: a few parts make a real multipart upload


def make_generation(root: Path, key: str = "web", size: int = 3 * PART + 12345) -> store_layout.Generation:
    store = store_layout.Store(str(root))
    pending = store.begin(key)
    os.makedirs(os.path.join(pending.temp, "checkpoint"))
    with open(os.path.join(pending.temp, "checkpoint", "pages-1.img"), "wb") as f:
        f.write(os.urandom(size))
    with open(os.path.join(pending.temp, "checkpoint", "inventory.img"), "wb") as f:
        f.write(b"inventory")
    with open(os.path.join(pending.temp, "spec.dump"), "w") as f:
        f.write("{}")
    names = ["checkpoint/inventory.img", "checkpoint/pages-1.img", "spec.dump"]
    files = store_layout.hash_files(pending.temp, names, part_size=PART)  # the small parts, as the store's
    manifest = store_layout.Manifest(key=key, generation=1, created=store_layout.now_rfc3339(), node="node-a",
                                     identity=store_layout.Identity("c1"), files=tuple(files))
    return pending.commit_as(manifest)


@pytest.fixture
def tier(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Tier:
    config = S3Config.from_env(s3_server.env("cluster-a"))
    assert config is not None
    for name, value in s3_server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)  # credentials from the standard AWS environment
    return S3Tier(config)


def test_config_is_off_without_a_bucket_and_normalises_the_prefix() -> None:
    assert S3Config.from_env({}) is None
    config = S3Config.from_env({"KYBERNATE_S3_BUCKET": "b", "KYBERNATE_S3_PREFIX": "/a/b/"})
    assert config is not None and config.prefix == "a/b/" and config.object_key("k", 2, "x") == "a/b/k/2/x"


def test_upload_then_a_fresh_store_downloads_the_same_verified_generation(tier: S3Tier, tmp_path: Path,
                                                                          s3_server: S3Server) -> None:
    gen = make_generation(tmp_path / "a")
    # What the client sends, recorded on the client (the test server does not keep additional checksums:
    # tests/harness/s3server.py): each part's SHA256 checksum header, and the completed upload's ETag.
    checksums: dict[int, str] = {}
    completed: list[str] = []
    tier.client.meta.events.register("before-call.s3.UploadPart", lambda params, **_: checksums.update(
        {int(params["query_string"]["partNumber"]): params["headers"].get("x-amz-checksum-sha256", "")}))
    tier.client.meta.events.register("after-call.s3.CompleteMultipartUpload",
                                     lambda parsed, **_: completed.append(parsed["ETag"]))
    sent = []
    assert tier.upload(gen, sent.append) == gen.manifest.size
    assert sum(sent) == gen.manifest.size + len(gen.manifest.to_json())
    assert tier.generations("web") == [1] and tier.keys() == ["web"]
    # The big file went up in 4 parts, each with the manifest's SHA256 of that part as its checksum ...
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="cluster-a/web/1/checkpoint/pages-1.img")
    assert head["ContentLength"] == 3 * PART + 12345 and completed[0].strip("\"").endswith("-4"), (head, completed)
    [entry] = [f for f in gen.manifest.files if f.path == "checkpoint/pages-1.img"]
    assert [checksums[n] for n in sorted(checksums)] == [base64.b64encode(bytes.fromhex(p)).decode()
                                                         for p in entry.parts], checksums
    # ... so S3's composite checksum (the SHA256 of the part digests) is the manifest's sha256 of the file.
    digests = b"".join(base64.b64decode(checksums[n]) for n in sorted(checksums))
    assert hashlib.sha256(digests).hexdigest() == entry.sha256
    fresh = store_layout.Store(str(tmp_path / "b"))
    got = tier.download(fresh, "web")
    assert got.number == 1 and got.manifest.files == gen.manifest.files
    fresh.verify(fresh.open("web", 1))
    assert (tmp_path / "b" / "web" / "1" / "checkpoint" / "pages-1.img").read_bytes() == \
        (tmp_path / "a" / "web" / "1" / "checkpoint" / "pages-1.img").read_bytes()
    assert (tmp_path / "b" / "web" / "1" / "manifest.json").read_bytes() == \
        (tmp_path / "a" / "web" / "1" / "manifest.json").read_bytes()  # the manifest byte for byte
    assert tier.download(fresh, "web", 1).path == got.path  # already local: no second copy


def test_a_damaged_object_is_refused_naming_the_file_and_nothing_is_kept(tier: S3Tier, tmp_path: Path,
                                                                         s3_server: S3Server) -> None:
    gen = make_generation(tmp_path / "a")
    tier.upload(gen)
    name = "cluster-a/web/1/checkpoint/pages-1.img"
    data = bytearray((tmp_path / "a" / "web" / "1" / "checkpoint" / "pages-1.img").read_bytes())
    data[PART + 7] ^= 0xFF
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=name, Body=bytes(data))
    fresh = store_layout.Store(str(tmp_path / "b"))
    with pytest.raises(store_layout.Corrupt, match="checkpoint/pages-1.img: sha256 does not match") as err:
        tier.download(fresh, "web")
    assert name in str(err.value) and err.value.path == "checkpoint/pages-1.img"
    assert fresh.generations("web") == [] and os.listdir(fresh.key_dir("web")) == []  # temp dir removed


def test_a_generation_whose_manifest_was_not_uploaded_is_invisible(tier: S3Tier, tmp_path: Path,
                                                                   s3_server: S3Server) -> None:
    gen = make_generation(tmp_path / "a")
    # One listed file vanished locally: its upload fails, so the manifest is never sent.
    os.unlink(os.path.join(gen.path, "spec.dump"))
    with pytest.raises(S3Error, match="upload of cluster-a/web/1/spec.dump failed"):
        tier.upload(gen)
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="cluster-a/web/1/")
    names = {o["Key"] for o in listed.get("Contents", ())}
    assert "cluster-a/web/1/checkpoint/pages-1.img" in names and "cluster-a/web/1/manifest.json" not in names
    assert tier.generations("web") == []
    with pytest.raises(store_layout.NotFound, match="no complete checkpoint for key 'web'"):
        tier.download(store_layout.Store(str(tmp_path / "b")), "web")


def test_an_unreachable_endpoint_is_a_clear_error(tmp_path: Path, s3_server: S3Server,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**s3_server.env(), "KYBERNATE_S3_ENDPOINT": f"http://127.0.0.1:{s3_server.port}"}
    s3_server.stop()
    config = S3Config.from_env(env)
    assert config is not None
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    with pytest.raises(S3Error, match=f"upload of web/1/.* failed .*127.0.0.1:{s3_server.port}"):
        S3Tier(config).upload(make_generation(tmp_path / "a"))


def test_kybernate_prefetch_downloads_and_registers_both_tiers(tier: S3Tier, tmp_path: Path, s3_server: S3Server,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from kybernate.hooks.cli import store_cli

    tier.upload(make_generation(tmp_path / "a"))
    for name, value in s3_server.env("cluster-a").items():
        monkeypatch.setenv(name, value)
    common = ["--store", str(tmp_path / "b"), "--registry", str(tmp_path / "registry.db")]
    assert store_cli.main(["prefetch", "web@1", *common]) == 0
    assert "prefetched web@1" in capsys.readouterr().err
    store_layout.Store(str(tmp_path / "b")).verify(store_layout.Store(str(tmp_path / "b")).open("web", 1))
    assert store_cli.main(["ls", "--json", *common]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["key"], row["generation"], row["state"], row["tiers"]) == ("web", 1, "uploaded", ["local", "s3"])
    # A generation S3 does not have, and no S3 tier at all: clear errors, nothing created.
    assert store_cli.main(["prefetch", "web@2", *common]) == 1
    assert "no complete generation 2" in capsys.readouterr().err
    monkeypatch.delenv("KYBERNATE_S3_BUCKET")
    assert store_cli.main(["prefetch", "web", *common]) == 2
    assert "S3 tier is not configured" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "b" / "web")) == ["1"]


def test_a_resumed_upload_skips_complete_objects_and_restarts_unfinished_parts(tier: S3Tier, tmp_path: Path,
                                                                              s3_server: S3Server) -> None:
    gen = make_generation(tmp_path / "a")
    assert tier.upload(gen) == gen.manifest.size
    s3 = s3_server.client()
    prefix = "cluster-a/web/1/"
    # As an interrupted attempt leaves it: no manifest, one file missing, a multipart upload left open.
    s3.delete_object(Bucket=s3_server.bucket, Key=prefix + "manifest.json")
    s3.delete_object(Bucket=s3_server.bucket, Key=prefix + "spec.dump")
    s3.create_multipart_upload(Bucket=s3_server.bucket, Key=prefix + "spec.dump")
    assert tier.generations("web") == []  # invisible remotely
    sent: list[str] = []
    tier.client.meta.events.register("before-call.s3.*", lambda model, **_: sent.append(model.name))
    counted: list[int] = []
    assert tier.upload(gen, counted.append, resume=True) == gen.manifest.size
    # Only the missing file and the manifest went up; the open multipart upload was aborted.
    uploads = [n for n in sent if n in ("PutObject", "UploadPart", "CreateMultipartUpload")]
    assert uploads == ["PutObject", "PutObject"], sent
    assert "AbortMultipartUpload" in sent
    assert s3.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix).get("Uploads", []) == []
    assert sum(counted) == gen.manifest.size + len(gen.manifest.to_json())
    assert tier.generations("web") == [1]
    fresh = tier.download(store_layout.Store(str(tmp_path / "b")), "web")
    assert fresh.manifest == gen.manifest


def test_a_node_that_never_saw_a_key_rebuilds_its_index_from_s3(tier: S3Tier, tmp_path: Path,
                                                                s3_server: S3Server) -> None:
    from kybernate.hooks.api.store_registry import Registry

    gen1 = make_generation(tmp_path / "a", size=100)
    tier.upload(gen1)
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_server.bucket, Key="cluster-a/not..ours/1/manifest.json", Body=b"{}")  # skipped
    fresh = Registry(str(tmp_path / "fresh.db"))
    assert fresh.rebuild(store_layout.Store(str(tmp_path / "fresh")), tier.manifests()) == 1
    [row] = fresh.rows()
    assert (row.key, row.generation, row.state, row.tiers, row.size, row.uploaded_bytes, row.node) == \
        ("web", 1, "uploaded", "s3", gen1.manifest.size, gen1.manifest.size, "node-a")
    # The newest complete generation there is what a prefetch (or a restore) takes.
    got = tier.download(store_layout.Store(str(tmp_path / "fresh")), "web")
    assert got.number == 1 and got.manifest == gen1.manifest


# ---- retention in S3 (docs/store.md "Retention and space") ----

def uploaded(tier: S3Tier, store: store_layout.Store, registry: sr.Registry, key: str = "web",
             count: int = 1) -> list[store_layout.Generation]:
    """`count` new local generations of `key`, each uploaded and registered as hookd does."""
    made = []
    for _ in range(count):
        pending = store.begin(key)
        os.makedirs(os.path.join(pending.temp, "checkpoint"))
        with open(os.path.join(pending.temp, "checkpoint", "pages-1.img"), "wb") as f:
            f.write(os.urandom(4096))
        with open(os.path.join(pending.temp, "spec.dump"), "w") as f:
            f.write("{}")
        gen = pending.commit(store_layout.Identity("c1"))
        registry.record_local(gen)
        tier.upload(gen)
        registry.upload_done(key, gen.number, gen.manifest.size)
        made.append(gen)
    return made


def remote_objects(s3_server: S3Server, prefix: str) -> set[str]:
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for o in listed.get("Contents", ())}


def delete_requests(s3_server: S3Server, prefix: str) -> list[str]:
    """The DELETE requests the server logged under `prefix`, in order, relative to it."""
    return [name[len(prefix):] for name in s3_server.requests("DELETE", prefix)]


def test_retention_deletes_older_generations_in_s3_manifest_first(tier: S3Tier, tmp_path: Path,
                                                                   s3_server: S3Server) -> None:
    store = store_layout.Store(str(tmp_path / "store"))
    registry = sr.Registry(str(tmp_path / "registry.db"))
    uploaded(tier, store, registry, count=4)
    uploaded(tier, store, registry, key="job")
    report = sr.collect(store, registry, keep=2, budget_bytes=None, remote=tier)
    assert report.removed == ("web@1 (retention: keep 2)", "web@2 (retention: keep 2)",
                              "web@1 (retention: keep 2, s3)", "web@2 (retention: keep 2, s3)")
    assert tier.generations("web") == [3, 4] and tier.generations("job") == [1]
    assert remote_objects(s3_server, "cluster-a/web/1/") == set() == remote_objects(s3_server, "cluster-a/web/2/")
    assert remote_objects(s3_server, "cluster-a/web/3/") == {"manifest.json", "checkpoint/pages-1.img", "spec.dump"}
    # Manifest first (no reader takes a half-deleted generation for complete), after the marker; marker last.
    for number in (1, 2):
        order = delete_requests(s3_server, f"cluster-a/web/{number}/")
        assert order[0] == "manifest.json" and order[-1] == ".deleting", order
        assert sorted(order[1:-1]) == ["checkpoint/pages-1.img", "spec.dump"], order
    assert [(r.key, r.generation, r.tiers) for r in registry.rows()] == [
        ("job", 1, "local,s3"), ("web", 3, "local,s3"), ("web", 4, "local,s3")]


def test_retention_in_s3_counts_only_what_s3_holds_and_spares_queued_uploads(tier: S3Tier, tmp_path: Path,
                                                                              s3_server: S3Server) -> None:
    store = store_layout.Store(str(tmp_path / "store"))
    registry = sr.Registry(str(tmp_path / "registry.db"))
    uploaded(tier, store, registry, count=2)  # web@1, web@2 in S3
    # Two newer generations only on this node's disk (their uploads not done): S3's two are its only
    # complete copies of the key, so keep 2 deletes nothing there.
    for _ in range(2):
        pending = store.begin("web")
        os.makedirs(os.path.join(pending.temp, "checkpoint"))
        with open(os.path.join(pending.temp, "checkpoint", "pages-1.img"), "wb") as f:
            f.write(b"new")
        registry.record_local(gen := pending.commit(store_layout.Identity("c1")))
        registry.queue_upload("web", gen.number)
    assert sr.retain_remote(tier, store, registry, "web", keep=2) == []
    assert tier.generations("web") == [1, 2]
    # web@3 uploaded (hookd's row still says `uploading`: it is being uploaded): S3 holds 1, 2, 3, but 3 is
    # spared as queued, and `busy` spares 1 as well (a restore of it on this node, say).
    tier.upload(store.open("web", 3))
    assert sr.retain_remote(tier, store, registry, "web", keep=1, busy={1}) == [2]
    assert tier.generations("web") == [1, 3]
    registry.upload_done("web", 3, 1)
    assert sr.retain_remote(tier, store, registry, "web", keep=1) == [1]
    assert tier.generations("web") == [3]
    with pytest.raises(store_layout.StoreError, match="keep must be at least 1"):
        tier.retain("web", 0)


def test_a_deletion_cut_short_is_invisible_and_finished_by_the_next_retention(tier: S3Tier, tmp_path: Path,
                                                                              s3_server: S3Server) -> None:
    store = store_layout.Store(str(tmp_path / "store"))
    registry = sr.Registry(str(tmp_path / "registry.db"))
    uploaded(tier, store, registry, count=2)
    # As if a deletion of web@1 died after its marker and the manifest went: readers no longer see web@1.
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="cluster-a/web/1/.deleting", Body=b"")
    client.delete_object(Bucket=s3_server.bucket, Key="cluster-a/web/1/manifest.json")
    assert tier.generations("web") == [2] and [m.generation for m in tier.manifests()] == [2]
    with pytest.raises(store_layout.NotFound):
        tier.download(store_layout.Store(str(tmp_path / "b")), "web", 1)
    assert tier.retain("web", keep=5) == [1]  # keep 5 would keep it: the marker says it was already doomed
    assert remote_objects(s3_server, "cluster-a/web/1/") == set()
    assert tier.generations("web") == [2]


def test_retention_in_s3_waits_for_a_download_of_the_key_on_this_node(tier: S3Tier, tmp_path: Path,
                                                                      s3_server: S3Server) -> None:
    store = store_layout.Store(str(tmp_path / "store"))
    registry = sr.Registry(str(tmp_path / "registry.db"))
    uploaded(tier, store, registry, count=2)
    with store.lock("web"):  # what a restore's or a prefetch's download of the key holds
        with pytest.raises(store_layout.StoreError, match="another process on this node has held its lock"):
            sr.retain_remote(tier, store, registry, "web", keep=1, lock_wait_s=0.2)
    assert tier.generations("web") == [1, 2]
    assert sr.retain_remote(tier, store, registry, "web", keep=1) == [1]


def test_kybernate_store_gc_applies_retention_in_s3(tier: S3Tier, tmp_path: Path, s3_server: S3Server,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from kybernate.hooks.cli import store_cli

    store = store_layout.Store(str(tmp_path / "store"))
    registry = sr.Registry(str(tmp_path / "registry.db"))
    uploaded(tier, store, registry, count=3)
    for name, value in s3_server.env("cluster-a").items():
        monkeypatch.setenv(name, value)
    assert store_cli.main(["store", "gc", "--keep", "1", "--store", store.root, "--registry", registry.path]) == 0
    err = capsys.readouterr().err
    assert "removed web@1 (retention: keep 1, s3)" in err and "removed web@2 (retention: keep 1, s3)" in err
    assert tier.generations("web") == [3] and store.generations("web") == [3]

