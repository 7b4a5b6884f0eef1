"""kybernate.io/* annotation values are bounded before anything resolves them (issue 9, finding 4)."""

from __future__ import annotations

import os

import pytest

from kybernate.shim import annotation_limits, restore_from
from kybernate.shim.annotation_limits import RESTORE_FROM, AnnotationError, check


@pytest.fixture
def no_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check must decide without a filesystem call: any would fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("filesystem touched while checking annotations")

    for name in ("realpath", "exists", "isfile", "lexists"):
        monkeypatch.setattr(os.path, name, refuse)
    monkeypatch.setattr(os, "stat", refuse)
    monkeypatch.setattr(os, "lstat", refuse)


@pytest.mark.parametrize(
    "annotations",
    [
        {},
        {RESTORE_FROM: "counter.tar"},
        {RESTORE_FROM: "team-a/2026/counter.tar", "kybernate.io/lock-timeout-ms": "5000"},
        {"kybernate.io/gpu": "true", "kybernate.io/pause-releases-vram": "false"},
        {"kybernate.io/standby-gpus": ",".join(["GPU-3ffe047a-0b03-a6b5-a359-0ecfad913d83"] * 16)},
        {"io.kubernetes.cri.sandbox-id": "x" * 100_000},  # not ours: not our business
    ],
)
def test_ordinary_values_pass(no_filesystem: None, annotations: dict[str, str]) -> None:
    check(annotations)


@pytest.mark.parametrize(
    "annotations, message",
    [
        ({RESTORE_FROM: "a/" * 500_000}, "value of 1000000 bytes is longer than the limit of 1024 bytes"),
        ({RESTORE_FROM: "a/" * 33}, "path has 33 components, more than the limit of 32"),
        ({RESTORE_FROM: "x" * 256}, "path component 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... is longer than 255 bytes"),
        ({RESTORE_FROM: "counter\0.tar"}, "control character '\\x00'"),
        ({RESTORE_FROM: "counter.tar\n"}, "control character '\\n'"),
        ({"kybernate.io/lock-timeout-ms": "9" * 257}, "value of 257 bytes is longer than the limit of 256 bytes"),
        ({"kybernate.io/" + "k" * 200: "1"}, "is longer than 128 bytes"),
        ({"kybernate.io/gpu": 1}, "the value must be a string, got int"),
        ({"kybernate.io/standby-gpus": "1," * 600}, "value of 1200 bytes is longer than the limit of 1024 bytes"),
    ],
)
def test_bad_values_name_the_annotation_and_the_limit(no_filesystem: None, annotations: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(AnnotationError) as failure:
        check(annotations)
    assert message in str(failure.value)
    key = next(iter(annotations))
    assert key[:40] in str(failure.value)


def test_the_limits_are_what_the_docs_say() -> None:
    assert (annotation_limits.MAX_PATH_BYTES, annotation_limits.MAX_PATH_COMPONENTS,
            annotation_limits.MAX_COMPONENT_BYTES, annotation_limits.MAX_VALUE_BYTES,
            annotation_limits.MAX_KEY_BYTES) == (1024, 32, 255, 256, 128)


def test_resolve_refuses_a_nul_byte_with_a_restore_error(tmp_path) -> None:
    # Defence in depth behind check(): os.path.realpath would raise a bare ValueError.
    with pytest.raises(restore_from.RestoreError, match="NUL"):
        restore_from.resolve("a\0b.tar", str(tmp_path))
