"""A small CRI client (runtime.v1 over gRPC on containerd's socket) that plays the kubelet in tests.

Built on Kybernate's own proto/kybernate/api/cri.proto. The helpers cover the pod and container lifecycle
the tests drive; `runtime`/`images` (the raw stubs) and `pb` (the messages) are there for anything else.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc

from kybernate.api import cri_pb2 as pb
from kybernate.api import cri_pb2_grpc

__all__ = ["CriClient", "pb"]


class CriClient:
    def __init__(self, address: str | Path, *, timeout: float = 30.0) -> None:
        self.address = str(address)
        # Seconds for every call unless a helper says otherwise.
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.address}")
        self.runtime = cri_pb2_grpc.RuntimeServiceStub(self._channel)
        self.images = cri_pb2_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handler_features(self) -> dict[str, pb.RuntimeHandlerFeatures]:
        """What the runtime reports per runtime handler ("" is the default handler); containerd 2.x only."""
        status = self.runtime.Status(pb.StatusRequest(), timeout=self.timeout)
        return {h.name: h.features for h in status.runtime_handlers}

    def version(self) -> pb.VersionResponse:
        return self.runtime.Version(pb.VersionRequest(version="v1"), timeout=self.timeout)

    # ---- pods ----

    def pod_config(
        self,
        name: str,
        *,
        namespace: str = "default",
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        log_directory: str = "",
    ) -> pb.PodSandboxConfig:
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=namespace),
            hostname=name,
            log_directory=log_directory,
            labels=labels or {},
            annotations=annotations or {},
            linux=pb.LinuxPodSandboxConfig(),
        )

    def run_pod(self, config: pb.PodSandboxConfig, *, runtime_handler: str = "") -> str:
        req = pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self.runtime.RunPodSandbox(req, timeout=self.timeout).pod_sandbox_id

    def pod_status(self, pod_id: str) -> pb.PodSandboxStatus:
        req = pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
        return self.runtime.PodSandboxStatus(req, timeout=self.timeout).status

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def list_pods(self) -> list[pb.PodSandbox]:
        return list(self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=self.timeout).items)

    # ---- containers ----

    def create_container(
        self,
        pod_id: str,
        pod_config: pb.PodSandboxConfig,
        name: str,
        image: str,
        *,
        command: list[str] | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        log_path: str = "",
        mounts: list[pb.Mount] | None = None,
        own_pid_namespace: bool = False,
    ) -> str:
        """own_pid_namespace: the container gets a pid namespace of its own, as the kubelet asks for every
        container of a pod without shareProcessNamespace (CRI's default, without it, is the pod's)."""
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image),
            command=command or [],
            args=args or [],
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            annotations=annotations or {},
            log_path=log_path,
            mounts=mounts or [],
        )
        if own_pid_namespace:
            config.linux.security_context.namespace_options.pid = pb.CONTAINER
        req = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
        return self.runtime.CreateContainer(req, timeout=self.timeout).container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop_container(self, container_id: str, *, grace_s: int = 0) -> None:
        req = pb.StopContainerRequest(container_id=container_id, timeout=grace_s)
        self.runtime.StopContainer(req, timeout=self.timeout + grace_s)

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id), timeout=self.timeout)

    def container_status(self, container_id: str) -> pb.ContainerStatus:
        req = pb.ContainerStatusRequest(container_id=container_id)
        return self.runtime.ContainerStatus(req, timeout=self.timeout).status

    def list_containers(self, pod_id: str = "") -> list[pb.Container]:
        req = pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.runtime.ListContainers(req, timeout=self.timeout).containers)

    def exec_sync(self, container_id: str, cmd: list[str], *, timeout_s: int = 10) -> pb.ExecSyncResponse:
        req = pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout_s)
        return self.runtime.ExecSync(req, timeout=self.timeout + timeout_s)

    def checkpoint_container(self, container_id: str, location: str | Path, *, timeout_s: int = 60) -> None:
        req = pb.CheckpointContainerRequest(container_id=container_id, location=str(location), timeout=timeout_s)
        self.runtime.CheckpointContainer(req, timeout=timeout_s + 10)

    # ---- cleanup ----

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every pod (its containers go with it); returns what failed, as text."""
        errors = []
        for pod in self.list_pods():
            for step in (self.stop_pod, self.remove_pod):
                try:
                    step(pod.id)
                except grpc.RpcError as e:
                    errors.append(f"{step.__name__}({pod.id[:12]}): {e.code().name} {e.details()}")
        return errors
