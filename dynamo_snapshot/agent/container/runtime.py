"""A CRI ``RuntimeService``/``ImageService`` client over the runtime's unix socket.

The agent uses it to map a container to its host PID, OCI spec and sandbox (``ContainerStatus`` with
verbose info, which containerd and CRI-O both fill with ``pid`` and ``runtimeSpec``). The kubelet-like
calls (sandboxes, containers, exec) are thin and used by the test harness the same way a kubelet would.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from dynamo_snapshot.agent.container import cri_stubs
from dynamo_snapshot.agent.errors import AgentError

log = structlog.get_logger(__name__)


class RuntimeType(enum.StrEnum):
    CONTAINERD = "containerd"
    CRIO = "crio"


DEFAULT_SOCKETS: Mapping[RuntimeType, str] = {
    RuntimeType.CONTAINERD: "/run/containerd/containerd.sock",
    RuntimeType.CRIO: "/var/run/crio/crio.sock",
}


def default_socket(runtime_type: RuntimeType | str) -> str:
    """The socket a runtime listens on by default (``runtime.type`` in the snapshot chart)."""
    try:
        return DEFAULT_SOCKETS[RuntimeType(runtime_type)]
    except ValueError:
        raise ValueError(
            f"unknown container runtime type {runtime_type!r}; expected one of "
            f"{', '.join(t.value for t in RuntimeType)}"
        ) from None


class CRIError(AgentError):
    """A CRI call failed; the message names the call, the object and the runtime's reason."""

    def __init__(self, call: str, subject: str, cause: grpc.aio.AioRpcError | str):
        reason = cause if isinstance(cause, str) else f"{cause.code().name}: {cause.details()}"
        super().__init__(f"CRI {call} for {subject} failed: {reason}")
        self.code = None if isinstance(cause, str) else cause.code()


class ContainerNotFound(CRIError):
    pass


@dataclass(frozen=True)
class ContainerInfo:
    """What the agent needs to know about one container."""

    id: str
    name: str
    state: str  # CONTAINER_CREATED | CONTAINER_RUNNING | CONTAINER_EXITED | CONTAINER_UNKNOWN
    pid: int  # host PID of the container's init process; 0 when it is not running
    sandbox_id: str
    image: str
    exit_code: int
    spec: dict[str, Any] = field(repr=False)  # the OCI runtime spec
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "CONTAINER_RUNNING" and self.pid > 0

    @property
    def env(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.spec.get("process", {}).get("env", []))
        return {k: v for k, *rest in pairs for v in (rest or [""])}


class CRIClient:
    """Async CRI client (grpc.aio). Use as ``async with CRIClient(socket) as cri: ...``."""

    def __init__(self, socket_path: str, timeout: float = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self.pb, services = cri_stubs.load()
        self._channel = grpc.aio.insecure_channel(f"unix://{socket_path}")
        self._runtime = services.RuntimeServiceStub(self._channel)
        self._images = services.ImageServiceStub(self._channel)

    async def __aenter__(self) -> CRIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, stub: Any, method: str, request: Any, subject: str, deadline_s: float | None = None) -> Any:
        try:
            return await getattr(stub, method)(request, timeout=deadline_s or self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ContainerNotFound(method, subject, exc) from exc
            raise CRIError(method, subject, exc) from exc

    async def version(self) -> Any:
        return await self._call(self._runtime, "Version", self.pb.VersionRequest(), self.socket_path)

    async def container_info(self, container_id: str) -> ContainerInfo:
        """Resolve a container to its host PID, OCI spec and sandbox."""
        resp = await self._call(
            self._runtime,
            "ContainerStatus",
            self.pb.ContainerStatusRequest(container_id=container_id, verbose=True),
            f"container {container_id}",
        )
        raw = resp.info.get("info")
        if not raw:
            raise CRIError("ContainerStatus", f"container {container_id}", "runtime returned no verbose info")
        try:
            info = json.loads(raw)
        except ValueError as exc:
            raise CRIError("ContainerStatus", f"container {container_id}", f"verbose info is not JSON: {exc}") from exc
        status = resp.status
        return ContainerInfo(
            id=status.id,
            name=status.metadata.name,
            state=self.pb.ContainerState.Name(status.state),
            pid=int(info.get("pid") or 0),
            sandbox_id=info.get("sandboxID", ""),
            image=status.image.image or status.image_ref,
            exit_code=status.exit_code,
            spec=info.get("runtimeSpec") or {},
            labels=dict(status.labels),
            annotations=dict(status.annotations),
        )

    # --- kubelet-side calls -------------------------------------------------------------------------

    async def run_pod_sandbox(self, config: Any, runtime_handler: str = "") -> str:
        resp = await self._call(
            self._runtime,
            "RunPodSandbox",
            self.pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
            f"pod sandbox {config.metadata.namespace}/{config.metadata.name}",
            deadline_s=120,
        )
        return resp.pod_sandbox_id

    async def sandbox_status(self, sandbox_id: str) -> Any:
        return await self._call(
            self._runtime,
            "PodSandboxStatus",
            self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
            f"pod sandbox {sandbox_id}",
        )

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        await self._call(
            self._runtime,
            "StopPodSandbox",
            self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
            f"pod sandbox {sandbox_id}",
            deadline_s=120,
        )

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        await self._call(
            self._runtime,
            "RemovePodSandbox",
            self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
            f"pod sandbox {sandbox_id}",
            deadline_s=120,
        )

    async def list_pod_sandboxes(self) -> list[Any]:
        resp = await self._call(self._runtime, "ListPodSandbox", self.pb.ListPodSandboxRequest(), "all sandboxes")
        return list(resp.items)

    async def create_container(self, sandbox_id: str, config: Any, sandbox_config: Any) -> str:
        resp = await self._call(
            self._runtime,
            "CreateContainer",
            self.pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config),
            f"container {config.metadata.name} in sandbox {sandbox_id}",
            deadline_s=120,
        )
        return resp.container_id

    async def start_container(self, container_id: str) -> None:
        await self._call(
            self._runtime,
            "StartContainer",
            self.pb.StartContainerRequest(container_id=container_id),
            f"container {container_id}",
            deadline_s=120,
        )

    async def stop_container(self, container_id: str, timeout_s: int = 10) -> None:
        await self._call(
            self._runtime,
            "StopContainer",
            self.pb.StopContainerRequest(container_id=container_id, timeout=timeout_s),
            f"container {container_id}",
            deadline_s=timeout_s + 60,
        )

    async def remove_container(self, container_id: str) -> None:
        await self._call(
            self._runtime,
            "RemoveContainer",
            self.pb.RemoveContainerRequest(container_id=container_id),
            f"container {container_id}",
            deadline_s=120,
        )

    async def exec_sync(self, container_id: str, cmd: list[str], timeout_s: int = 10) -> tuple[int, bytes, bytes]:
        resp = await self._call(
            self._runtime,
            "ExecSync",
            self.pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout_s),
            f"container {container_id}",
            deadline_s=timeout_s + 30,
        )
        return resp.exit_code, resp.stdout, resp.stderr

    async def image_present(self, image: str) -> bool:
        resp = await self._call(
            self._images,
            "ImageStatus",
            self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=image)),
            f"image {image}",
        )
        return resp.HasField("image")
