"""The operator: checkpoint, PVC and DynamoGraphDeployment controllers in one leader-elected process."""
