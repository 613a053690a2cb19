"""A real local control plane for development and tests (not used in production)."""

from dynamo_snapshot.devcluster.binaries import K8S_VERSION, MissingBinaries
from dynamo_snapshot.devcluster.cluster import ClusterError, Component, LocalCluster

__all__ = ["K8S_VERSION", "ClusterError", "Component", "LocalCluster", "MissingBinaries"]
