"""``snapshot-agent``: the node daemon (the snapshot chart's DaemonSet runs it, one per GPU node).

    snapshot-agent --node-name=$(NODE_NAME) --namespace=$(POD_NAMESPACE) [--namespace-restricted]
                   --runtime-type=containerd --runtime-socket=/run/containerd/containerd.sock
                   --storage-access-mode=agentMount --storage-base-path=/checkpoints
                   --host-proc=/host/proc --config=/etc/snapshot-agent/config.yaml --metrics-bind-address=:9090

With ``storage.type: s3`` in the configuration (``storageconfig.py``) checkpoints are uploaded to and restored
from object storage: ``--storage-base-path`` is the node-local directory a checkpoint is written in before
its upload (agentMount, created at start; no PVC), and a restore fetches the version into the node cache
(``cache``, required with s3).

Serves /metrics, /healthz and /readyz (ready once its pod cache is synced). SIGTERM or SIGINT stops it:
running operations get ``--drain-timeout`` seconds to finish.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import prometheus_client
import structlog

from dynamo_snapshot.agent.artifact import private
from dynamo_snapshot.agent.artifact.authn import Keyring, KeyringError, default_keyring
from dynamo_snapshot.agent.artifact.manifest import Compatibility
from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.artifact.storage import StorageMode, StorageResolver
from dynamo_snapshot.agent.container.criu import CriuBundle, CriuSettings
from dynamo_snapshot.agent.container.runtime import CRIClient, CRIError, RuntimeType, default_socket
from dynamo_snapshot.agent.cuda.step import CudaStep, default_step
from dynamo_snapshot.agent.host import procfs
from dynamo_snapshot.agent.service.config import AgentConfig, CacheSettings, ConfigError, RestoreSettings, load
from dynamo_snapshot.agent.service.storageconfig import credentials, object_storage

log = structlog.get_logger("dynamo_snapshot.agent")

EVENT_CONTROLLER = "nvidia.com/snapshot-agent"
RUNTIME_WAIT_S = 60.0


@dataclass(frozen=True)
class AgentOptions:
    node_name: str
    namespace: str | None  # the agent's own namespace
    namespace_restricted: bool
    runtime_type: RuntimeType
    runtime_socket: str
    storage_mode: StorageMode
    storage_base_path: str
    criu: CriuSettings
    restore: RestoreSettings = field(default_factory=RestoreSettings)
    keyring: Keyring | None = None  # None: authn.default_keyring()
    cache: CacheSettings = field(default_factory=CacheSettings)  # the node-local checkpoint cache (off: none)
    metrics_bind_address: str = ":9090"
    kubeconfig: str | None = None
    workers: int = 2
    drain_timeout: float = 90.0
    identity: str = ""
    remote: ObjectStorage | None = None  # storage.type s3: the bucket; storage_base_path is node-local

    @property
    def watched_namespace(self) -> str | None:
        """agentMount serves its own namespace only (it mounts that namespace's PVC); so does a restricted agent.
        With object storage there is no namespace's PVC: every namespace, unless restricted."""
        if self.namespace_restricted or (self.storage_mode is StorageMode.AGENT_MOUNT and self.remote is None):
            return self.namespace
        return None


def cuda_step() -> CudaStep:
    """The CUDA step of this node: the driver's checkpoint API where there are NVIDIA GPUs; elsewhere the
    no-op one, which refuses workloads holding GPU devices rather than dumping them incompletely."""
    return default_step()


async def _connect_runtime(cri: CRIClient) -> None:
    """Wait for the container runtime (it may start after the agent); it has no readiness notification."""
    with anyio.fail_after(RUNTIME_WAIT_S):
        while True:
            try:
                await cri.version()
                return
            except CRIError as err:
                log.warning("container runtime not reachable yet", socket=cri.socket_path, error=str(err))
                await anyio.sleep(2.0)


def agent_identity(node_name: str) -> str:
    """One identity per node, the same after a restart: a restarted agent recognises its own node's
    checkpoint Leases and takes them over at once (one agent runs per node: the DaemonSet's)."""
    return f"snapshot-agent-{node_name}"


def local_directory(path: Path) -> None:
    """Object storage: the node-local directory the versions pass through, the agent's only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


async def run_agent(options: AgentOptions, bundle: CriuBundle) -> None:
    from dynamo_snapshot.agent.service.daemon import Agent
    from dynamo_snapshot.agent.service.metrics import AgentMetrics
    from dynamo_snapshot.agent.service.nodeops import CriuNode
    from dynamo_snapshot.agent.service.operations import Operations
    from dynamo_snapshot.httpserve import ProbeServer
    from dynamo_snapshot.kube import Client, EventRecorder, InformerFactory

    identity = options.identity or agent_identity(options.node_name)
    probes = ProbeServer(options.metrics_bind_address)
    # Not ready until the pod cache is synced: a /readyz that answered before the agent even watched pods
    # told the DaemonSet (and the dev stack, which starts tests on it) that a blind agent was serving.
    agent: Agent | None = None
    probes.add_readiness_check("pods", lambda: None if agent is not None and agent.synced
                               else "pod cache is syncing")
    async with Client.from_config(options.kubeconfig) as client, CRIClient(options.runtime_socket) as cri:
        async with anyio.create_task_group() as tg:
            await tg.start(probes.serve)
            await _connect_runtime(cri)
            storage = StorageResolver(options.storage_mode, options.storage_base_path, cri)
            if options.remote is not None:
                local_directory(Path(options.storage_base_path))
            private.sweep(Path(options.restore.private_dir))  # copies a killed predecessor left mid-restore
            cache = node_cache(options)  # sweeps the fills a killed predecessor left
            cuda = cuda_step()
            node = CriuNode(cri, bundle, storage, options.criu, cuda, options.restore, options.keyring,
                            cache, remote=options.remote)
            recorder = EventRecorder(client, controller=EVENT_CONTROLLER, instance=identity)
            metrics = AgentMetrics(prometheus_client.REGISTRY)
            if cache is not None:
                metrics.watch_cache(cache)
            operations = Operations(client, node, recorder, identity, metrics)
            factory = InformerFactory(client)
            agent = Agent(factory, operations, node_name=options.node_name,
                          namespace=options.watched_namespace, workers=options.workers,
                          drain_timeout=options.drain_timeout)
            if cache is not None:  # pre-staging and drops of deleted checkpoints (service/staging.py)
                stager = stager_for(options, client, factory, cache, bundle, cuda, identity, metrics)
                tg.start_soon(stager.controller.run)
            if options.remote is not None:  # deleted checkpoints' objects removed (service/cleanup.py)
                from dynamo_snapshot.agent.service.cleanup import Cleaner

                cleaner = Cleaner(client, factory, options.remote, watched_namespace=options.watched_namespace,
                                  identity=identity)
                tg.start_soon(cleaner.controller.run)
            log.info("snapshot agent starting", node=options.node_name, identity=identity,
                     runtime=f"{options.runtime_type}:{options.runtime_socket}",
                     storage=f"{options.storage_mode}:{options.storage_base_path}", criu=str(bundle.path),
                     objects=options.remote.describe_root() if options.remote else None)
            try:
                await agent.run()
            finally:
                if cache is not None:
                    cache.close()  # a fill under way stops; the next start sweeps it
            tg.cancel_scope.cancel()


def node_cache(options: AgentOptions) -> NodeCache | None:
    """The node-local checkpoint cache the configuration asks for (``cache``), or None."""
    if not options.cache.enabled:
        return None
    cache = NodeCache(Path(options.cache.dir), options.cache.budget_bytes, options.restore.verify_threads)
    log.info("node cache", directory=options.cache.dir, budget_bytes=options.cache.budget_bytes,
             entries=len(cache.entries()), used_bytes=cache.used_bytes)
    return cache


def stager_for(options: AgentOptions, client: Any, factory: Any, cache: NodeCache, bundle: CriuBundle,
               cuda: CudaStep, identity: str, metrics: Any) -> Any:
    """The node cache's watch on DynamoCheckpoints: stage what the operator names for this node, drop what
    is deleted. Only an agentMount agent has storage to read ahead of a pod (podMount: drops only)."""
    from dynamo_snapshot.agent.service.staging import Stager, StagingSource

    async def here() -> Compatibility:
        state = await cuda.node_state()
        return Compatibility.of_this_node(await anyio.to_thread.run_sync(bundle.version), state.driver_version,
                                          state.gpus, state.gpu_models)

    source = (StagingSource(Path(options.storage_base_path), options.keyring or default_keyring(), here,
                            options.remote) if options.storage_mode is StorageMode.AGENT_MOUNT else None)
    return Stager(client, factory, cache, node_name=options.node_name, watched_namespace=options.watched_namespace,
                  lease_namespace=options.namespace, source=source, identity=identity, metrics=metrics)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapshot-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (default: NODE_NAME)")
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"),
                        help="the agent's own namespace (default: POD_NAMESPACE)")
    parser.add_argument("--namespace-restricted", action="store_true",
                        help="serve pods of the agent's own namespace only (always so in agentMount)")
    parser.add_argument("--runtime-type", default=RuntimeType.CONTAINERD.value,
                        choices=[t.value for t in RuntimeType])
    parser.add_argument("--runtime-socket", default="", help="the CRI socket (default: the runtime type's)")
    parser.add_argument("--storage-access-mode", default=StorageMode.AGENT_MOUNT.value,
                        choices=[m.value for m in StorageMode])
    parser.add_argument("--storage-base-path", default="/checkpoints",
                        help="agentMount: where the agent mounts the PVC; podMount: where pods mount it")
    parser.add_argument("--host-proc", default="/proc", help="the host's /proc as mounted in the agent")
    parser.add_argument("--config", help="agent configuration file (criu and restore options)")
    parser.add_argument("--metrics-bind-address", default=":9090", help="serve /metrics, /healthz, /readyz here")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--workers", type=int, default=2, help="pods looked at in parallel")
    parser.add_argument("--drain-timeout", type=float, default=90.0,
                        help="seconds a stop waits for running operations before cancelling them")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    return parser


def _remote(configured: AgentConfig, mode: StorageMode, base_path: str, env: dict[str, str]) -> ObjectStorage | None:
    """The object storage the configuration asks for (None: PVC storage). Raises ConfigError."""
    s3 = configured.storage.s3
    if s3 is None:
        return None
    if mode is not StorageMode.AGENT_MOUNT:
        raise ConfigError(f"--storage-access-mode {mode}: storage.type s3 needs agentMount (the agent writes "
                          "versions in its node-local --storage-base-path before the upload; no pod mounts storage)")
    cache, base = Path(configured.cache.dir), Path(base_path.rstrip("/") or "/")
    if cache == base or base in cache.parents or cache in base.parents:
        raise ConfigError(f"cache.dir: {cache} overlaps --storage-base-path {base} (where checkpoints are written "
                          "before their upload); give the node cache a directory of its own")
    return object_storage(s3, credentials(s3, env))


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> AgentOptions:
    if not args.node_name:
        parser.error("--node-name is required (or NODE_NAME)")
    mode = StorageMode(args.storage_access_mode)
    try:
        configured = load(args.config)
        keyring = Keyring.from_directory(configured.key_directory)
        remote = _remote(configured, mode, args.storage_base_path, dict(os.environ))
    except (ConfigError, KeyringError) as err:
        parser.error(str(err))
    if (args.namespace_restricted or (mode is StorageMode.AGENT_MOUNT and remote is None)) and not args.namespace:
        why = "--namespace-restricted" if args.namespace_restricted else "agentMount"
        parser.error(f"--namespace is required with {why} (or POD_NAMESPACE)")
    return AgentOptions(
        node_name=args.node_name,
        namespace=args.namespace,
        namespace_restricted=args.namespace_restricted,
        runtime_type=RuntimeType(args.runtime_type),
        runtime_socket=args.runtime_socket or default_socket(args.runtime_type),
        storage_mode=mode,
        storage_base_path=args.storage_base_path.rstrip("/") or "/",
        criu=configured.criu,
        restore=configured.restore,
        keyring=keyring,
        cache=configured.cache,
        metrics_bind_address=args.metrics_bind_address,
        kubeconfig=args.kubeconfig,
        workers=args.workers,
        drain_timeout=args.drain_timeout,
        remote=remote,
    )


def kubeconfig_problem(kubeconfig: str | None) -> str | None:
    """Why the cluster configuration cannot be used, in one line naming the file (None when it can)."""
    from dynamo_snapshot.kube import ConfigError as KubeConfigError
    from dynamo_snapshot.kube import load_config

    flag = f"--kubeconfig {kubeconfig}" if kubeconfig else "the cluster configuration"
    try:
        load_config(kubeconfig)
    except KubeConfigError as err:
        return f"{flag}: {err}"
    except IsADirectoryError:
        return f"{flag}: is a directory; pass a kubeconfig file"
    except (OSError, ValueError, RecursionError, AttributeError, TypeError) as err:
        # not text, not the kubeconfig schema (a fuzzed or wrong file): what Python says, without a traceback
        return f"{flag}: not a usable kubeconfig ({type(err).__name__}: {str(err)[:200]})"
    return None


def use_host_proc(path: str) -> None:
    """Read processes from the host's /proc as mounted in the agent (the helper processes get every
    path they need on their command line)."""
    procfs.configure(Path(path))


def main(argv: list[str] | None = None) -> int:
    from dynamo_snapshot import logs
    from dynamo_snapshot.kube import KubeError
    from dynamo_snapshot.lifecycle import run_until_signalled

    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    options = options_from(args, parser)
    if reason := kubeconfig_problem(options.kubeconfig):
        parser.error(reason)
    use_host_proc(args.host_proc)
    try:
        bundle = CriuBundle.locate()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        anyio.run(run_until_signalled, lambda: run_agent(options, bundle))
    except (KubeError, CRIError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
