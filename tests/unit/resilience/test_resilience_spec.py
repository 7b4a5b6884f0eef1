"""The resilience annotations (docs/resilience.md): parsed once at Create, hostile values refused."""

from __future__ import annotations

import pytest

from kybernate.shim.errors import FailedPrecondition, InvalidArgument
from kybernate.shim.runtime_options import KybernateOptions, OptionsError, from_toml
from kybernate.shim.taskspec import (
    CHECKPOINT_EVERY,
    CHECKPOINT_KEEP,
    CHECKPOINT_KEY,
    CHECKPOINT_ON_STOP,
    CHECKPOINT_ON_STOP_SIGNAL,
    CHECKPOINT_ON_STOP_TIMEOUT,
    DEFAULT_KEEP,
    RESUME,
    Resilience,
    TaskSpec,
    parse_duration,
)

CRI = {"io.kubernetes.cri.sandbox-namespace": "ml", "io.kubernetes.cri.sandbox-name": "train-0",
       "io.kubernetes.cri.container-name": "main"}


def parse(notes: dict[str, str], options: KybernateOptions | None = None) -> TaskSpec:
    return TaskSpec.parse("cid", "k8s.io", "/b", {"annotations": notes}, options or KybernateOptions())


def test_no_resilience_annotation_means_none() -> None:
    assert parse(CRI).resilience is None


def test_all_annotations_with_their_values() -> None:
    got = parse({**CRI, CHECKPOINT_KEY: "trainer", CHECKPOINT_ON_STOP: "true", CHECKPOINT_ON_STOP_TIMEOUT: "25s",
                 CHECKPOINT_ON_STOP_SIGNAL: "SIGINT", CHECKPOINT_EVERY: "10m", CHECKPOINT_KEEP: "5", RESUME: "latest"})
    assert got.resilience == Resilience(key="trainer", on_stop=True, on_stop_timeout_s=25.0, stop_signal=2,
                                        every_s=600.0, keep=5, resume_latest=True)


def test_defaults_the_key_timeout_signal_and_keep() -> None:
    got = parse({**CRI, CHECKPOINT_ON_STOP: "true"}, KybernateOptions(checkpoint_on_stop_timeout_s=12.0))
    assert got.resilience == Resilience(key="ml_train-0_main", on_stop=True, on_stop_timeout_s=12.0,
                                        stop_signal=15, every_s=None, keep=DEFAULT_KEEP, resume_latest=False)


def test_the_pods_sandbox_takes_no_part() -> None:
    notes = {**CRI, "io.kubernetes.cri.container-type": "sandbox", CHECKPOINT_ON_STOP: "true", RESUME: "latest"}
    assert parse(notes).resilience is None


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("1m30s", 90), ("2h", 7200), ("500ms", 0.5),
                                           ("1.5m", 90), ("1h0m1s", 3601)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "m5", "5x", "5 s", "-5s", "1..2s", "5s5", "٥s", "1e3s", "5S"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("notes, message", [
    ({CHECKPOINT_KEY: "../etc"}, "checkpoint-key"),
    ({CHECKPOINT_KEY: "a/b"}, "path separator"),
    ({CHECKPOINT_KEY: "k@1"}, "'@'"),
    ({CHECKPOINT_ON_STOP: "yes"}, "want true or false"),
    ({CHECKPOINT_ON_STOP_TIMEOUT: "soon"}, "want a duration"),
    ({CHECKPOINT_ON_STOP_TIMEOUT: "0s"}, "from 1 s to 3600 s"),
    ({CHECKPOINT_ON_STOP_TIMEOUT: "2h"}, "from 1 s to 3600 s"),
    ({CHECKPOINT_EVERY: "100ms"}, "from 1 s to 604800 s"),
    ({CHECKPOINT_EVERY: "9" * 200 + "h"}, "from 1 s"),
    ({CHECKPOINT_KEEP: "0"}, "1..1000"),
    ({CHECKPOINT_KEEP: "-1"}, "1..1000"),
    ({CHECKPOINT_KEEP: "1001"}, "1..1000"),
    ({CHECKPOINT_KEEP: "²"}, "1..1000"),
    ({RESUME: "newest"}, "only value is 'latest'"),
    ({CHECKPOINT_ON_STOP_SIGNAL: "SIGKILL"}, "cannot stop a program gracefully"),
    ({CHECKPOINT_ON_STOP_SIGNAL: "9"}, "SIGTERM"),
    ({CHECKPOINT_ON_STOP_SIGNAL: "19"}, "SIGTERM"),
])
def test_hostile_values_are_refused_naming_the_annotation(notes: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse({**CRI, **notes})


@pytest.mark.parametrize("value, number", [("SIGTERM", 15), ("term", 15), ("INT", 2), ("10", 10)])
def test_stop_signal_names_and_numbers(value: str, number: int) -> None:
    resilience = parse({CHECKPOINT_ON_STOP: "true", CHECKPOINT_ON_STOP_SIGNAL: value}).resilience
    assert resilience is not None and resilience.stop_signal == number


def test_resume_and_restore_from_together_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="both given"):
        parse({RESUME: "latest", "kybernate.io/restore-from": "store:x"})


def test_overlong_values_stop_at_the_generic_bound_first() -> None:
    with pytest.raises(InvalidArgument, match="longer than the limit"):
        parse({CHECKPOINT_EVERY: "1" * 10_000})


def test_empty_restore_is_still_a_restore_error() -> None:
    with pytest.raises(FailedPrecondition):
        parse({"kybernate.io/restore-from": " "})


def test_node_default_timeout_in_runtime_toml() -> None:
    config = from_toml("[kybernate]\ncheckpoint_on_stop_timeout_s = 45\n")
    assert config.kybernate.checkpoint_on_stop_timeout_s == 45.0
    with pytest.raises(OptionsError, match="out of range"):
        from_toml("[kybernate]\ncheckpoint_on_stop_timeout_s = 0\n")
