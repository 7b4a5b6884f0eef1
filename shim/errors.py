"""The shim's errors: each class carries the status it becomes; `to_status` is the one place that maps them.

Every condition the shim knows of raises a ShimError subclass (or a hookd client error, or a ttrpc
status from the runc shim). The task service's edge turns whatever a handler raised into a ttrpc
status through `to_status`; an exception nobody expected becomes INTERNAL, its traceback logged.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from .ttrpc.errors import Code, TTRPCError

log = logging.getLogger(__name__)


class ShimError(Exception):
    """Base of every error the shim reports on purpose; `code` is the ttrpc status it becomes."""

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShimError):
    """The request or the container's spec is wrong; nothing was changed."""

    code = Code.INVALID_ARGUMENT


class NotFound(ShimError):
    """No task (or hibernated task) of that id in this shim."""

    code = Code.NOT_FOUND


class AlreadyExists(ShimError):
    """A task of that id exists in this shim already."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(ShimError):
    """The task or the node is not in a state where the step can work; the message says what to do."""

    code = Code.FAILED_PRECONDITION


class Unavailable(ShimError):
    """A service the step needs (kybernate-hookd) does not answer."""

    code = Code.UNAVAILABLE


class Internal(ShimError):
    """The shim found itself in a state it should never reach (a bug); the message names it."""

    code = Code.INTERNAL


def to_status(err: BaseException, what: str = "") -> TTRPCError:
    """The ttrpc status for any error a handler raised; `what` prefixes the message (e.g. the call)."""
    prefix = f"{what}: " if what else ""
    if isinstance(err, TTRPCError):
        return err
    if isinstance(err, ShimError):
        return TTRPCError(err.code, prefix + err.message)
    # The hookd client's errors, named by class so this module stays import-free of the client.
    kind = type(err).__name__
    if kind == "HookdUnavailable":
        return TTRPCError(Code.UNAVAILABLE, prefix + str(err))
    if kind == "HookdError":
        return TTRPCError(Code.from_wire(int(getattr(err, "code", Code.UNKNOWN))),
                          prefix + str(getattr(err, "message", err)))
    if kind == "ManifestError":
        return TTRPCError(Code.INVALID_ARGUMENT, prefix + str(err))
    if isinstance(err, TimeoutError):
        return TTRPCError(Code.DEADLINE_EXCEEDED, prefix + (str(err) or "timed out"))
    log.error("request crashed", exc_info=err, extra={"fields": {"what": what, "error": repr(err)}})
    return TTRPCError(Code.INTERNAL, f"{prefix}internal error in the kybernate shim ({type(err).__name__}: {err}); "
                                     "see the shim's log")
