"""The snapshot agent's node machinery: CRI client, CRIU driver, checkpoint and restore pipelines.

Modules here may import only ``dynamo_snapshot.api``, ``dynamo_snapshot.hashing`` and
``dynamo_snapshot.kube`` from the rest of the project; keep this file free of imports (helper
processes start with ``python -m dynamo_snapshot.agent.<module>``).
"""
