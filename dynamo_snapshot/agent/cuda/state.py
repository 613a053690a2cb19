"""What the CUDA step records of a checkpoint's GPU processes, and reads back from a manifest: the
driver release, the GPUs (UUIDs and models), which GPUs each process sees and computes on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.devices import Gpu


@dataclass(frozen=True)
class CudaState:
    """What a checkpoint's CUDA step recorded; goes into the manifest (compatibility and ``cuda``)."""

    driver_version: str | None = None
    gpus: tuple[str, ...] = ()  # UUIDs of every GPU a checkpointed process could see (the driver's state)
    processes: tuple[int, ...] = field(default=())  # PIDs that held CUDA state (host PIDs at checkpoint)
    gpu_models: tuple[str, ...] = ()  # model of each entry of ``gpus``
    process_gpus: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # PID -> GPUs it could see
    # PID -> GPUs it computed on (NVML); a restore must give it these. Absent: all it could see.
    process_compute_gpus: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def computing(self) -> set[str]:
        """The GPUs some process computed on (all of ``gpus`` where that was not recorded)."""
        found = {
            u for pid in self.processes for u in self.process_compute_gpus.get(pid, self.process_gpus.get(pid, ()))
        }
        return found or set(self.gpus)

    @property
    def devices(self) -> list[Gpu]:
        models = dict(zip(self.gpus, self.gpu_models, strict=False))
        return [Gpu(uuid=u, model=models.get(u, ""), minor=i) for i, u in enumerate(self.gpus)]

    def manifest_block(self, to_recorded_pid: Callable[[int], int | None] = lambda p: p) -> dict[str, Any]:
        """The manifest's ``cuda`` object, with PIDs as the restore will see them (``to_recorded_pid``
        maps host PIDs to the container's)."""
        processes, per_process, computing = [], {}, {}
        for pid in self.processes:
            recorded = to_recorded_pid(pid)
            if recorded is None:
                continue
            processes.append(recorded)
            per_process[str(recorded)] = list(self.process_gpus.get(pid, ()))
            if pid in self.process_compute_gpus:
                computing[str(recorded)] = list(self.process_compute_gpus[pid])
        return {
            "processes": sorted(processes),
            "processGpus": per_process,
            "processComputeGpus": computing,
            "devices": [{"uuid": u, "model": m} for u, m in zip(self.gpus, self.gpu_models, strict=False)],
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> CudaState:
        compat = manifest.get("compatibility") or {}
        block = manifest.get("cuda") or {}
        gpus, models = cuda_devices.recorded_gpus(compat.get("gpus"))
        return cls(
            driver_version=compat.get("cudaDriverVersion"),
            gpus=tuple(gpus),
            processes=tuple(int(p) for p in block.get("processes") or ()),
            gpu_models=tuple(models),
            process_gpus={int(k): tuple(v) for k, v in (block.get("processGpus") or {}).items()},
            process_compute_gpus={int(k): tuple(v) for k, v in (block.get("processComputeGpus") or {}).items()},
        )
