"""Byte-exact identifiers (SPEC section 3)."""

from dynamo_snapshot.hashing.gojson import GoStruct, marshal
from dynamo_snapshot.hashing.ids import (
    derived_dgd_checkpoint_id,
    dgd_checkpoint_id,
    identity_hash,
    identity_hash_input,
    worker_hash,
    worker_hash_input,
)

__all__ = [
    "GoStruct",
    "derived_dgd_checkpoint_id",
    "dgd_checkpoint_id",
    "identity_hash",
    "identity_hash_input",
    "marshal",
    "worker_hash",
    "worker_hash_input",
]
