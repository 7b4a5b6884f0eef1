"""The SQLite index of the store: rows from manifests, rebuild, retention, the local budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kybernate.hooks.api import store as sl
from kybernate.hooks.api import store_registry as sr

IDENT = sl.Identity(container_id="c1")


def write(store: sl.Store, key: str, size: int, gpu: dict | None = None) -> sl.Generation:
    pending = store.begin(key)
    Path(pending.temp, "checkpoint").mkdir()
    Path(pending.temp, "checkpoint", "pages-1.img").write_bytes(b"x" * size)
    return pending.commit(IDENT, gpu=gpu)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[sl.Store, sr.Registry]:
    return sl.Store(str(tmp_path / "store")), sr.Registry(str(tmp_path / "db" / "registry.db"))


def test_rows_follow_the_manifests_and_a_wiped_index_rebuilds_the_same(setup) -> None:
    store, registry = setup
    for key, size in (("web", 100), ("web", 200), ("job", 50)):
        registry.record_local(write(store, key, size, gpu={"processes": 1, "vram_bytes": 7}))
    rows = registry.rows()
    assert [(r.key, r.generation, r.state, r.tiers, r.size) for r in rows] == [
        ("job", 1, "complete", "local", 50), ("web", 1, "complete", "local", 100),
        ("web", 2, "complete", "local", 200)]
    assert rows[0].gpu == {"processes": 1, "vram_bytes": 7} and rows[0].node and rows[0].container == "c1"
    os.unlink(registry.path)
    assert registry.rows() == []
    assert registry.rebuild(store) == 3

    def stable(rs: list[sr.Row]) -> list[dict]:
        return [{k: v for k, v in r.to_dict().items() if k != "last_used"} for r in rs]

    assert stable(registry.rows()) == stable(rows)
    assert [r.generation for r in registry.rows("web")] == [1, 2]


def test_retention_keeps_the_newest_n_per_key(setup) -> None:
    store, registry = setup
    for _ in range(4):
        registry.record_local(write(store, "web", 10))
    registry.record_local(write(store, "job", 10))
    report = sr.collect(store, registry, keep=2, budget_bytes=None)
    assert report.removed == ("web@1 (retention: keep 2)", "web@2 (retention: keep 2)")
    assert store.generations("web") == [3, 4] and store.generations("job") == [1]
    assert [(r.key, r.generation) for r in registry.rows()] == [("job", 1), ("web", 3), ("web", 4)]
    assert sorted(os.listdir(store.key_dir("web"))) == ["3", "4"]  # no delete leftovers
    with pytest.raises(sl.StoreError, match="keep must be at least 1"):
        sr.collect(store, registry, keep=0, budget_bytes=None)


def test_the_budget_evicts_least_recently_used_uploaded_copies_only(setup) -> None:
    store, registry = setup
    a = write(store, "a", 100)
    b = write(store, "b", 100)
    c = write(store, "c", 100)
    for g in (a, b, c):
        registry.record_local(g)
    registry.touch("a", 1)  # a is the most recently used now
    # Nothing uploaded: nothing may go, the report says by how much the budget is exceeded.
    report = sr.collect(store, registry, keep=3, budget_bytes=150)
    assert report.removed == () and report.over_budget_by > 0
    assert store.generations("b") == [1]
    # a and b are in S3 too: b (least recently used of those) goes first, then a; c (only copy) stays.
    registry.set_state("a", 1, sr.UPLOADED, remote=True)
    registry.set_state("b", 1, sr.UPLOADED, remote=True)
    report = sr.collect(store, registry, keep=3, budget_bytes=150)
    assert report.removed == ("b@1 (budget: local copy evicted, kept in s3)", "a@1 (budget: local copy evicted, kept in s3)")
    assert store.generations("b") == [] and store.generations("c") == [1]
    rows = {r.key: r for r in registry.rows()}
    assert (rows["b"].local, rows["b"].remote, rows["b"].tiers) == (False, True, "s3")
    assert rows["c"].tiers == "local" and report.over_budget_by == 0
