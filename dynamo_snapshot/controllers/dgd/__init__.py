"""The DynamoGraphDeployment controller (SPEC section 5): ReplicaSets per worker generation, automatic
checkpoints, checkpointRef, startup policies and restore-shaped pods."""
