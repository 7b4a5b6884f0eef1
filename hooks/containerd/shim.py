"""Our shim's own ttrpc socket: a checkpoint straight into the store, hibernate and wake (hookd's store, standby).

containerd 1.6's task service passes a caller's checkpoint image path on only to runtimes named
`io.containerd.runc*`, and containerd's own checkpoint copies the dump into its content store. So the store
asks our shim directly: the socket address is derived from containerd's address, the namespace and the
container's shim group exactly as the shim derives it (shim/manager.py socket_address), and Checkpoint is
called with `path` = the store's temp dir. The shim runs its GPU steps and has its runc child dump there.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2

from kybernate.api import hibernate_pb2, runc_options_pb2, task_pb2
from kybernate.hooks.api.checkpoint import CHECKPOINT_OPTIONS_TYPE
from kybernate.hooks.api.errors import Code
from kybernate.shim.manager import group_id, socket_address, spec_annotations

__all__ = ["ShimCallFailed", "ShimUnreachable", "shim_addresses", "shim_checkpoint", "shim_hibernate", "shim_wake",
           "spec_annotations"]

NAMESPACE_KEY = "containerd-namespace-ttrpc"
TASK_SERVICE = "containerd.task.v2.Task"  # our shim serves v2 and v3 alike and renames for its child
HIBERNATE_SERVICE = "kybernate.hibernate.v1.Hibernate"  # our shim's own (shim/hibernate.py)


class ShimUnreachable(RuntimeError):
    """No kybernate shim answers at any address the container's shim could have."""


class ShimCallFailed(RuntimeError):
    """The shim answered with an error status (`code`: the shared Code; DEADLINE_EXCEEDED when the deadline passed)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def shim_addresses(containerd_address: str, namespace: str, spec: dict[str, Any], container_id: str) -> list[str]:
    """Where our shim for this container listens: the address containerd gave it, spelled as containerd
    spells its own (a bare path; tried also with unix:// since an operator may write either)."""
    group = group_id(spec, container_id)
    bare = containerd_address.removeprefix("unix://")
    return [socket_address(a, namespace, group) for a in (bare, "unix://" + bare)]


async def shim_checkpoint(addresses: list[str], namespace: str, container_id: str, path: str, *, exit: bool,
                          timeout: float) -> None:
    """Task.Checkpoint on our shim with the image path `path`. The shim cancels its handler when `timeout`
    passes (the ttrpc deadline travels with the request) and then undoes its GPU steps.
    Raises ShimUnreachable, or ShimCallFailed with the status the shim answered (or the connection's end)."""
    options = any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE,
                          value=runc_options_pb2.CheckpointOptions(exit=exit).SerializeToString())
    request = task_pb2.CheckpointTaskRequest(id=container_id, path=path, options=options)
    await _call(addresses, namespace, container_id, TASK_SERVICE, "Checkpoint", request.SerializeToString(),
                timeout, "the checkpoint")


async def shim_hibernate(addresses: list[str], namespace: str, container_id: str, path: str, *,
                         timeout: float) -> hibernate_pb2.HibernateResponse:
    """Hibernate on our shim (shim/hibernate.py): GPU state and CRIU images into `path` (an empty dir), the
    processes gone, containerd's view unchanged. On failure the shim has rolled the task back (it runs, or
    stays paused). Raises ShimUnreachable or ShimCallFailed."""
    request = hibernate_pb2.HibernateRequest(id=container_id, image_path=path)
    reply = await _call(addresses, namespace, container_id, HIBERNATE_SERVICE, "Hibernate",
                        request.SerializeToString(), timeout, "the hibernate")
    return hibernate_pb2.HibernateResponse.FromString(reply)


async def shim_wake(addresses: list[str], namespace: str, container_id: str, path: str, *,
                    timeout: float) -> hibernate_pb2.WakeResponse:
    """Wake on our shim: restore the hibernated task from `path` into the same container. On failure the
    task stays hibernated and the images untouched (Wake can be retried). Raises ShimUnreachable or ShimCallFailed."""
    request = hibernate_pb2.WakeRequest(id=container_id, image_path=path)
    reply = await _call(addresses, namespace, container_id, HIBERNATE_SERVICE, "Wake", request.SerializeToString(),
                        timeout, "the wake")
    return hibernate_pb2.WakeResponse.FromString(reply)


async def _call(addresses: list[str], namespace: str, container_id: str, service: str, method: str, payload: bytes,
                timeout: float, what: str) -> bytes:
    from kybernate.shim.ttrpc.client import Client
    from kybernate.shim.ttrpc.errors import ConnectionClosed, TTRPCError

    client = None
    tried = []
    for address in addresses:
        try:
            client = await Client.connect(address)
            break
        except OSError as err:
            tried.append(f"{address}: {err.strerror or err}")
    if client is None:
        raise ShimUnreachable(
            f"cannot reach the kybernate shim of {container_id!r} ({'; '.join(tried)}): is it running under "
            "the kybernate runtime, and is hookd's --containerd-address containerd's address as the shim was given it?")
    try:
        return await client.call(service, method, payload, metadata=((NAMESPACE_KEY, namespace),), timeout=timeout,
                                 timeout_nano=int(timeout * 1e9))
    except TTRPCError as err:
        raise ShimCallFailed(Code(int(err.code)), err.message) from None
    except ConnectionClosed as err:
        raise ShimCallFailed(Code.UNAVAILABLE, f"the shim closed the connection during {what}: {err}") from None
    finally:
        await client.close()
