"""GPU state: the CUDA checkpoint step, the driver API, which GPUs a process uses."""
