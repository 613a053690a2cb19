"""The container side: CRI client, control files, rootfs diff, the CRIU driver."""
