"""hookd's uploader (hooks/hookd/store/uploads.py) against a real S3-compatible server (tests/harness/s3server.py),
without containerd: a rebuilt registry's queued uploads are picked up by a running hookd, and once a new
generation is complete in S3 retention runs there. Every wait is on the server's or the registry's state."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from harness.s3server import S3Server

from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api import store_registry as sr
from kybernate.hooks.api.store_s3 import S3Config, S3Tier
from kybernate.hooks.hookd.settings import StoreSettings
from kybernate.hooks.hookd.store.uploads import Uploader


def write(store: store_layout.Store, key: str = "web") -> store_layout.Generation:
    pending = store.begin(key)
    os.makedirs(os.path.join(pending.temp, "checkpoint"))
    with open(os.path.join(pending.temp, "checkpoint", "pages-1.img"), "wb") as f:
        f.write(os.urandom(4096))
    return pending.commit(store_layout.Identity("c1"))


@pytest.fixture
def setup(tmp_path: Path, s3_server: S3Server,
          monkeypatch: pytest.MonkeyPatch) -> tuple[StoreSettings, store_layout.Store, sr.Registry, S3Tier]:
    for name, value in s3_server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    settings = StoreSettings(root=str(tmp_path / "store"), registry=str(tmp_path / "registry.db"), keep=1,
                             s3_bucket=s3_server.bucket, s3_endpoint=s3_server.endpoint, s3_prefix="cluster",
                             upload_rescan_s=0.1)
    config = S3Config.from_env(s3_server.env("cluster"))
    assert config is not None
    return settings, store_layout.Store(settings.root), sr.Registry(settings.registry), S3Tier(config)


async def until(what: str, check, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `check` (the server's or the registry's state) until it holds; a bounded wait, not a sleep."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not await loop.run_in_executor(None, check):
        if loop.time() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_rebuild_requeues_what_s3_lacks_and_a_running_hookd_uploads_it_then_retention_runs(setup) -> None:
    settings, store, registry, tier = setup
    first = write(store)
    registry.record_local(first)
    tier.upload(first)  # web@1 is in S3 already
    second = write(store)  # web@2 was queued for upload when the index was lost
    registry.record_local(second)
    registry.queue_upload("web", 2)
    os.unlink(registry.path)
    assert registry.rows() == []
    # No S3 tier known to the rebuild: nothing to compare with, web@2 is only `complete`.
    registry.rebuild(store)
    assert [(r.generation, r.state) for r in registry.rows()] == [(1, "complete"), (2, "complete")]
    # With the S3 tier: web@1 is `uploaded` (both tiers), web@2 queued again (`uploading`).
    registry.rebuild(store, tier.manifests())
    assert [(r.generation, r.state, r.tiers) for r in registry.rows()] == [
        (1, "uploaded", "local,s3"), (2, "uploading", "local")]
    assert [(r.key, r.generation) for r in registry.pending_uploads()] == [("web", 2)]

    async def go() -> None:
        uploader = Uploader(settings)
        try:
            await uploader.resume()  # a hookd that was running before the rebuild would find it the same way
            # keep 1: once web@2 is complete in S3, retention deletes web@1 there (its local copy is the local
            # retention's, which hookd runs after a checkpoint: it stays `complete` on this node's disk).
            await until("web@2 uploaded and web@1 gone from S3", lambda: [
                (r.generation, r.state, r.tiers) for r in registry.rows()] == [
                (1, "complete", "local"), (2, "uploaded", "local,s3")])
        finally:
            await uploader.stop()

    asyncio.run(go())
    assert tier.generations("web") == [2]


def test_a_running_hookd_picks_up_uploads_queued_behind_its_back(setup) -> None:
    settings, store, registry, tier = setup

    async def go() -> None:
        uploader = Uploader(settings)
        try:
            assert await uploader.resume() == 0  # nothing queued at start
            gen = await asyncio.get_running_loop().run_in_executor(None, write, store)
            registry.rebuild(store, tier.manifests())  # `kybernate store rebuild` on the node: web@1 queued
            await until("web@1 in S3", lambda: tier.generations("web") == [1])
            await until("web@1 uploaded", lambda: registry.rows()[0].state == "uploaded")
            assert gen.number == 1
        finally:
            await uploader.stop()

    asyncio.run(go())
