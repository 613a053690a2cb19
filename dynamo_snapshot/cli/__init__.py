"""Command-line entry points: `dynamo-snapshot` (operator, demo) and `snapshotctl`."""
