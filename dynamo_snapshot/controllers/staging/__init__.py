"""Pre-staging: which nodes fetch a Ready checkpoint ahead of its restores (placement.py), and the
controller that writes it into the checkpoint status (controller.py)."""
