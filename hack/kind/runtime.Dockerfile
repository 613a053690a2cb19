# syntax=docker/dockerfile:1
# The e2e's stand-in for a runtime image (vLLM, SGLang, ...): Python and a CPU worker as the ENTRYPOINT.
# hack/kind/e2e.sh wraps it with `make placeholder-image`, and the checkpoint pod sets no command, so the
# run proves the placeholder keeps the runtime's entrypoint under snapshot-init. Context: the repository.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# Warms a heap, says ready-for-snapshot, exits on snapshot-complete, and reports "restored" with a
# check of its heap when it wakes up in a restore pod (one JSON line per event).
COPY dynamo_snapshot/devcluster/counter_worker.py /opt/e2e/counter_worker.py
ENTRYPOINT ["python3", "/opt/e2e/counter_worker.py"]
