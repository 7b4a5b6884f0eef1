"""What can go wrong in kybernate-hookd, each kind with the gRPC status it becomes at the server edge.

Codes are members of the one Code enum (google.rpc.Code numbers, the same in gRPC and ttrpc) that the
shim's ttrpc layer, the hookd client and the hookd service share, so this module needs no grpc import
and the shim passes them through to containerd unchanged.
"""

from __future__ import annotations

from typing import ClassVar

from kybernate.shim.ttrpc.codes import Code as Code  # re-exported: the API's callers take it from here

OK = Code.OK
UNKNOWN = Code.UNKNOWN
INVALID_ARGUMENT = Code.INVALID_ARGUMENT
DEADLINE_EXCEEDED = Code.DEADLINE_EXCEEDED
RESOURCE_EXHAUSTED = Code.RESOURCE_EXHAUSTED
FAILED_PRECONDITION = Code.FAILED_PRECONDITION
ABORTED = Code.ABORTED
INTERNAL = Code.INTERNAL
UNAVAILABLE = Code.UNAVAILABLE


class KybernateError(Exception):
    """Base of every error hookd reports on purpose. `code` is the status it becomes at the edge.

    `pid`, `step` and `driver_error` say which process, which driver step and which CUresult name
    when a driver step is the cause; the service sends them as trailing metadata.
    """

    code: ClassVar[Code] = UNKNOWN

    def __init__(self, message: str, *, pid: int | None = None, step: str | None = None,
                 driver_error: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pid = pid
        self.step = step
        self.driver_error = driver_error


class InvalidRequest(KybernateError):
    """The request cannot be served as asked (no pids, a malformed GPU map)."""

    code = INVALID_ARGUMENT


class TooLarge(KybernateError):
    """The request is over one of hookd's per-request caps (pids, message size); nothing was changed."""

    code = RESOURCE_EXHAUSTED


class FailedPrecondition(KybernateError):
    """Nothing was changed: the node or the container is not in a state where the step can work."""

    code = FAILED_PRECONDITION


class ProcessPaused(FailedPrecondition):
    """A process is frozen or stopped: the driver would block until it runs again (measured)."""


class ProcessBusy(FailedPrecondition):
    """A driver call on this process from an earlier request has not returned yet."""


class InsufficientVram(FailedPrecondition):
    """A target GPU lacks the free VRAM the checkpoint needs; restoring anyway could strand the process."""


class NoMatchingGpu(FailedPrecondition):
    """A checkpointed GPU has no counterpart on this node (no same UUID, no free GPU of that model)."""


class DriverUnavailable(FailedPrecondition):
    """The CUDA driver (or the cuda-checkpoint binary) cannot be used on this node."""


class StepFailed(KybernateError):
    """A driver step failed; every process this request changed was put back as it was."""

    code = ABORTED


class LockTimeout(StepFailed):
    """A lock did not complete within its timeout; the container was put back as it was."""

    code = DEADLINE_EXCEEDED


class InheritedDropFailed(StepFailed):
    """The GPU device files a forked child inherited from a CUDA process could not be dropped."""


class RollbackFailed(KybernateError):
    """A step failed and putting the container back failed too: processes are left in mixed states."""

    code = INTERNAL


# Trailing metadata of a failed RPC: which process, which driver step, which CUresult name.
METADATA_PID = "kybernate-pid"
METADATA_STEP = "kybernate-step"
METADATA_DRIVER_ERROR = "kybernate-driver-error"
