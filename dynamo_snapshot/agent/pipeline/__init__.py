"""The staged checkpoint and restore pipelines and the guard that undoes a half-done one."""
