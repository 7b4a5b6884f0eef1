"""The store's S3 tier against a real S3-compatible server (tests/harness/s3server.py): upload with the
manifest last, verified download into a fresh store, a damaged object refused naming the file, a
generation without its manifest invisible remotely."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness.s3server import S3Server

from kybernate.hooks.api import store as store_layout
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
    sent = []
    assert tier.upload(gen, sent.append) == gen.manifest.size
    assert sum(sent) == gen.manifest.size + len(gen.manifest.to_json())
    assert tier.generations("web") == [1] and tier.keys() == ["web"]
    # The big file went up in parts, each with its own SHA256 checksum.
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="cluster-a/web/1/checkpoint/pages-1.img",
                                          ChecksumMode="ENABLED")
    assert head["ContentLength"] == 3 * PART + 12345 and head["ETag"].strip("\"").endswith("-4"), head
    assert head.get("ChecksumSHA256"), head  # the parts went with SHA256 checksums, and the server kept them
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
