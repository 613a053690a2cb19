"""The operator process: the checkpoint, PVC (and DGD) controllers behind one leader election, with
/metrics, /healthz and /readyz. `dynamo-snapshot operator` and `python -m dynamo_snapshot.controllers`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import anyio
import structlog

from dynamo_snapshot.api import OperatorConfig, load_config
from dynamo_snapshot.controllers.checkpoint.reconciler import CheckpointController
from dynamo_snapshot.controllers.common import EVENT_CONTROLLER
from dynamo_snapshot.controllers.dgd.reconciler import DGDController, uses_checkpoints
from dynamo_snapshot.controllers.pvc_controller import PVCController
from dynamo_snapshot.controllers.staging.controller import StagingController
from dynamo_snapshot.httpserve import ProbeServer
from dynamo_snapshot.kube import Client, EventRecorder, InformerFactory, LeaderElector
from dynamo_snapshot.kube.config import load_config as load_cluster_config

log = structlog.get_logger("dynamo_snapshot.operator")

DEFAULT_LEASE_NAME = "dynamo-snapshot-operator"


@dataclass
class OperatorOptions:
    kubeconfig: str | None = None
    config_path: str | None = None
    namespace: str | None = None  # watch one namespace; None: all
    leader_elect: bool = False
    leader_election_namespace: str | None = None
    leader_election_id: str = DEFAULT_LEASE_NAME
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    metrics_bind_address: str = ":8080"
    health_probe_bind_address: str = ":8081"
    workers: int = 4


class Operator:
    def __init__(self, options: OperatorOptions, config: OperatorConfig | None = None):
        self.options = options
        self.config = config or (load_config(options.config_path) if options.config_path else OperatorConfig())
        self.cluster = load_cluster_config(options.kubeconfig)  # ConfigError now, not inside the task group
        self.probes = ProbeServer(options.health_probe_bind_address)
        self.metrics = (ProbeServer(options.metrics_bind_address)
                        if options.metrics_bind_address != options.health_probe_bind_address else None)
        self.leading = not options.leader_elect
        self._synced = False
        self.probes.add_readiness_check("informers", lambda: None if self._synced or not self.leading
                                        else "informer caches are syncing")

    async def run(self) -> None:
        async with Client(self.cluster) as client:
            async with anyio.create_task_group() as tg:
                await tg.start(self.probes.serve)
                if self.metrics is not None:
                    await tg.start(self.metrics.serve)
                if self.options.leader_elect:
                    namespace = (self.options.leader_election_namespace or os.environ.get("POD_NAMESPACE")
                                 or client.namespace or "default")
                    elector = LeaderElector(
                        client, name=self.options.leader_election_id, namespace=namespace,
                        lease_duration=self.options.lease_duration, renew_deadline=self.options.renew_deadline,
                        retry_period=self.options.retry_period,
                        on_started_leading=lambda: setattr(self, "leading", True),
                        on_stopped_leading=lambda: setattr(self, "leading", False),
                    )
                    await elector.run(lambda: self._run_controllers(client))
                else:
                    await self._run_controllers(client)
                tg.cancel_scope.cancel()

    async def _run_controllers(self, client: Client) -> None:
        namespace = self.options.namespace
        factory = InformerFactory(client)
        recorder = EventRecorder(client, controller=EVENT_CONTROLLER)
        checkpoints = CheckpointController(client, factory, self.config, recorder, namespace=namespace,
                                           workers=self.options.workers)
        storage = PVCController(client, factory, self.config, recorder, namespace=namespace)
        graphs = DGDController(client, factory, self.config, recorder, namespace=namespace,
                               workers=self.options.workers)
        storage.add_users(graphs.dgds, uses_checkpoints)
        # pre-staging watches the cluster's Nodes: only when on (checkpoint.staging.maxNodes > 0)
        staging = (StagingController(client, factory, self.config, namespace=namespace)
                   if self.config.checkpoint.staging.max_nodes > 0 else None)
        log.info("starting controllers", namespace=namespace or "(all)",
                 checkpointing=self.config.checkpoint.enabled,
                 storage=self.config.checkpoint.storage.access_mode.value)
        async with anyio.create_task_group() as tg:
            await tg.start(recorder.run)  # events are written off the reconciles' path
            await tg.start(factory.run)
            self._synced = True
            tg.start_soon(checkpoints.controller.run)
            tg.start_soon(storage.controller.run)
            tg.start_soon(graphs.controller.run)
            if staging is not None:
                tg.start_soon(staging.controller.run)
