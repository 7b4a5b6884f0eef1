"""What can go wrong in kybernate-hookd, each kind with the gRPC status it becomes at the server edge.

Codes are the plain numbers of google.rpc.Code (the same in gRPC and ttrpc), so this module needs no
grpc import and the shim can pass them through to containerd unchanged.
"""

from __future__ import annotations

from typing import ClassVar

OK = 0
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
FAILED_PRECONDITION = 9
ABORTED = 10
INTERNAL = 13
UNAVAILABLE = 14


class KybernateError(Exception):
    """Base of every error hookd reports on purpose. `code` is the status it becomes at the edge.

    `pid`, `step` and `driver_error` say which process, which driver step and which CUresult name
    when a driver step is the cause; the service sends them as trailing metadata.
    """

    code: ClassVar[int] = UNKNOWN

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


class RollbackFailed(KybernateError):
    """A step failed and putting the container back failed too: processes are left in mixed states."""

    code = INTERNAL


# Trailing metadata of a failed RPC: which process, which driver step, which CUresult name.
METADATA_PID = "kybernate-pid"
METADATA_STEP = "kybernate-step"
METADATA_DRIVER_ERROR = "kybernate-driver-error"
