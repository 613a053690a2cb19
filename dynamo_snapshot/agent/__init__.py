"""The snapshot agent, in layers. Each subpackage imports only from the layers listed before it (and
``agent.errors``, the root of every agent error); ``tests/agent/test_layers.py`` fails on an upward
import:

    host       procfs, cgroups, PID arrangement, confined opens, the in-root helper process
    cuda       the CUDA checkpoint step, the driver API binding, the processes' GPUs (NVML, device files)
    container  the container runtime (CRI client and stubs), control files, rootfs diff, CRIU driver
    artifact   the checkpoint on storage: layout, manifest, verification, page check, prefetch, storage
    pipeline   the staged checkpoint and restore pipelines and the guard process
    service    the daemon: pod watch, operations and their Kubernetes protocol, Lease, config, metrics

``agent.tree`` is the command-line front end for host process trees (``python -m
dynamo_snapshot.agent.tree``). From the rest of the project the agent may import only
``dynamo_snapshot.api``, ``.hashing``, ``.kube``, ``.workload`` and the process helpers ``.httpserve``,
``.lifecycle`` and ``.logs`` (never the operator's ``.controllers``); keep these package files free of
imports (helper processes start with ``python -m dynamo_snapshot.agent.<layer>.<module>``).
"""

LAYERS = ("host", "cuda", "container", "artifact", "pipeline", "service")
