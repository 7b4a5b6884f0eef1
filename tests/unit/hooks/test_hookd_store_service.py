"""hookd's Store service on its socket, without containerd: bad requests are refused with their status
before anything is touched, the store's flags reach its settings, and the store's metrics are served.
(Checkpoints of real containers: tests/integration/test_store_*.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import fakegpu
import pytest
from hookd_testlib import run, sample
from test_hookd_service import http_get, serving, settings

from kybernate.hooks.api.client import HookdClient, HookdError
from kybernate.hooks.api.store import StoreFull
from kybernate.hooks.hookd.daemon import parse_args
from kybernate.hooks.hookd.service import to_status
from kybernate.hooks.hookd.settings import StoreSettings


def store_settings(tmp_path: Path, fake: fakegpu.Built):  # type: ignore[no-untyped-def]
    s = settings(tmp_path, fake)
    return replace(s, store=StoreSettings(root=str(tmp_path / "store"), registry=str(tmp_path / "registry.db"),
                                          containerd_address=str(tmp_path / "no-containerd.sock")))


def test_bad_requests_are_refused_with_their_status_and_nothing_is_created(
        tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode) -> None:
    s = store_settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s) as daemon, HookdClient(s.server.socket) as client:
            for key, code, says in (("../x", "INVALID_ARGUMENT", "path separator"),
                                    ("a\x01b", "INVALID_ARGUMENT", "control")):
                with pytest.raises(HookdError) as info:
                    await client.store_checkpoint("k8s.io", "c1", key, deadline_s=10)
                assert info.value.code_name == code and says in info.value.message, info.value
            # containerd unreachable: the step is named, nothing is left in the store.
            with pytest.raises(HookdError) as info:
                await client.store_checkpoint("k8s.io", "c1", "web", deadline_s=10)
            assert info.value.code_name == "ABORTED" and "cannot inspect container 'c1'" in info.value.message
            port = daemon.metrics_port
            assert port
            text = await http_get(port, "/metrics")
            assert sample(text, "kybernate_hookd_requests_total", rpc="Store.Checkpoint",
                          outcome="INVALID_ARGUMENT") == 2
            assert sample(text, "kybernate_hookd_store_failures_total", tier="local", operation="checkpoint") == 1
            assert sample(text, "kybernate_hookd_store_upload_backlog") == 0
            assert sample(text, "kybernate_hookd_store_bytes_total", tier="s3", operation="upload") == 0

    run(go())
    assert not (tmp_path / "store" / "web").exists() or list((tmp_path / "store" / "web").iterdir()) == []


def test_store_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYBERNATE_S3_BUCKET", "from-env")
    s = parse_args(["--store-root", "/x/store", "--store-registry", "/x/r.db", "--containerd-address", "/c.sock",
                    "--store-keep", "5", "--s3-prefix", "cluster", "--upload-max-parallel", "3"]).store
    assert (s.root, s.registry, s.containerd_address, s.keep, s.s3_bucket, s.s3_prefix, s.max_parallel_uploads) == \
        ("/x/store", "/x/r.db", "/c.sock", 5, "from-env", "cluster", 3)
    with pytest.raises(SystemExit):
        parse_args(["--store-keep", "0"])


def test_store_errors_map_to_statuses_in_one_place() -> None:
    status, message = to_status(StoreFull("the store is full")) or (None, "")
    assert status is not None and status.name == "RESOURCE_EXHAUSTED" and message == "the store is full"
    assert to_status(ValueError("a bug")) is None
