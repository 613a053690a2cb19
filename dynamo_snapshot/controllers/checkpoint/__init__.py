"""The checkpoint controller (SPEC section 4): DynamoCheckpoint -> checkpoint Job -> Ready | Failed."""
