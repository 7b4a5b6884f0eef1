import pytest

from kybernate.hooks.api import errors as hookd_errors
from kybernate.hooks.api.client import HookdError, HookdUnavailable
from kybernate.hooks.api.model import ManifestError
from kybernate.hooks.api import intent
from kybernate.shim.errors import FailedPrecondition, InvalidArgument, to_status
from kybernate.shim.ttrpc.errors import Code, TTRPCError


def test_intent_round_trip_is_atomic_and_validated(tmp_path):
    record = intent.Intent("ns", "c1", "/b", intent.PARKED, "checkpoint", "parked", 7, 9, (9, 10), {"gpus": []})
    intent.write(str(tmp_path), record)
    path = intent.path_of(str(tmp_path), "ns", "c1")
    assert intent.read(path) == record
    assert [p.name for p in path.parent.iterdir()] == ["c1.json"]  # no temporary left behind
    assert list(intent.scan(str(tmp_path))) == [path]
    path.write_text('{"version": 1, "desired": "flying"}')
    with pytest.raises(intent.IntentError):
        intent.read(path)
    with pytest.raises(intent.IntentError):
        intent.path_of(str(tmp_path), "ns", "../escape")


def test_one_code_enum_is_shared_by_hookd_and_the_shim():
    assert hookd_errors.FAILED_PRECONDITION is Code.FAILED_PRECONDITION
    assert hookd_errors.InsufficientVram.code is Code.FAILED_PRECONDITION
    err = HookdError(9, "short")
    assert err.code is Code.FAILED_PRECONDITION and err.code_name == "FAILED_PRECONDITION"
    assert HookdError(99, "?").code is Code.UNKNOWN


@pytest.mark.parametrize("error, code", [
    (InvalidArgument("bad"), Code.INVALID_ARGUMENT),
    (FailedPrecondition("no"), Code.FAILED_PRECONDITION),
    (HookdUnavailable("/s"), Code.UNAVAILABLE),
    (HookdError(10, "aborted"), Code.ABORTED),
    (ManifestError("pid: want int"), Code.INVALID_ARGUMENT),
    (TimeoutError("slow"), Code.DEADLINE_EXCEEDED),
    (TTRPCError(Code.NOT_FOUND, "gone"), Code.NOT_FOUND),
])
def test_known_errors_map_to_their_status(error, code):
    status = to_status(error, "c1: cannot pause")
    assert status.code is code
    assert status.message


def test_unknown_errors_become_internal_with_a_logged_traceback(caplog):
    status = to_status(KeyError("x"), "c1: cannot pause")
    assert status.code is Code.INTERNAL and "KeyError" in status.message
    assert any(r.exc_info for r in caplog.records)
