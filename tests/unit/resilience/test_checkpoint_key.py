"""The store key of a workload: the annotation, else a default a replacement pod computes again."""

from __future__ import annotations

import pytest

from kybernate.hooks.api.checkpoint_key import ANNOTATION, CONTAINER_NAME, POD_NAME, POD_NAMESPACE, key_for
from kybernate.hooks.api.store import MAX_KEY_LENGTH, BadKey, validate_key

CRI = {POD_NAMESPACE: "team-a", POD_NAME: "trainer-0", CONTAINER_NAME: "main"}


def test_explicit_annotation_wins() -> None:
    assert key_for({**CRI, ANNOTATION: "llama-finetune"}, "k8s.io", "abc") == "llama-finetune"


@pytest.mark.parametrize("bad", ["a/b", "..", "x..y", ".hidden", "k@3", "a\nb", "x" * (MAX_KEY_LENGTH + 1), "ü"])
def test_hostile_explicit_key_is_refused(bad: str) -> None:
    with pytest.raises(BadKey):
        key_for({ANNOTATION: bad}, "k8s.io", "abc")


def test_cri_default_is_namespace_pod_container() -> None:
    assert key_for(CRI, "k8s.io", "0123abcd") == "team-a_trainer-0_main"


def test_cri_default_does_not_depend_on_the_container_id() -> None:
    # A StatefulSet's replacement pod has the same name, a new container id: the same key.
    assert key_for(CRI, "k8s.io", "first") == key_for(CRI, "k8s.io", "second")


def test_plain_containerd_default_is_namespace_and_id() -> None:
    assert key_for({}, "default", "counter-1") == "default_counter-1"


def test_a_pod_annotation_without_the_container_name_uses_the_id() -> None:
    assert key_for({POD_NAME: "p"}, "k8s.io", "cid") == "k8s.io_cid"


def test_empty_annotation_means_default() -> None:
    assert key_for({**CRI, ANNOTATION: ""}, "k8s.io", "x") == "team-a_trainer-0_main"


def test_overlong_default_is_shortened_with_a_hash_and_stays_distinct() -> None:
    a = key_for({POD_NAMESPACE: "n" * 63, POD_NAME: "p" * 253, CONTAINER_NAME: "a"}, "k8s.io", "x")
    b = key_for({POD_NAMESPACE: "n" * 63, POD_NAME: "p" * 253, CONTAINER_NAME: "b"}, "k8s.io", "x")
    assert len(a) == MAX_KEY_LENGTH and validate_key(a) == a
    assert a != b


@pytest.mark.parametrize("cid", ["a/b", "..x", ".x", "x@y", "ä", "", "a..b...c"])
def test_default_from_odd_ids_is_always_valid_and_distinct(cid: str) -> None:
    key = key_for({}, "ns", cid)
    assert validate_key(key) == key
    assert key != key_for({}, "ns", cid + "z")


def test_default_from_odd_namespace_is_valid() -> None:
    key = key_for({}, ".", "c")
    assert validate_key(key) == key
