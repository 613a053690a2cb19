"""dynamo-snapshot: checkpoint warmed-up GPU inference workers and restore new replicas from the image."""

__version__ = "0.1.0"
