"""Host facts the agent reads and changes directly: /proc, cgroups, PIDs, confined opens."""
