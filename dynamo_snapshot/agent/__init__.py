"""The snapshot agent: its daemon (``main``, ``daemon``, ``operations``; docs/agent.md) and the node
machinery under it: CRI client, CRIU driver, checkpoint and restore pipelines (docs/node-machinery.md).

Modules here may import only ``dynamo_snapshot.api``, ``.hashing``, ``.kube``, ``.workload`` and the
process helpers ``.httpserve``, ``.lifecycle`` and ``.logs`` from the rest of the project (never the
operator's ``.controllers``); keep this file free of imports (helper processes start with
``python -m dynamo_snapshot.agent.<module>``).
"""
