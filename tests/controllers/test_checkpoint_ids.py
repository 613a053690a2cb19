"""Checkpoint IDs and Job names (controllers/checkpoint/ids.py): which source decides a checkpoint's ID."""


import pytest

from dynamo_snapshot.api import names
from dynamo_snapshot.controllers.checkpoint.ids import MissingAutoCheckpointID, resolve_checkpoint_id
from tests.controllers.support import decoded_checkpoint as ckpt_


def test_id_resolution_order():
    assert resolve_checkpoint_id(ckpt_()) == "96429b2725761a09"
    assert resolve_checkpoint_id(ckpt_(labels={names.LABEL_CHECKPOINT_ID: "from-label"})) == "from-label"
    auto = {names.ANN_AUTO_CHECKPOINT: "true"}
    with pytest.raises(MissingAutoCheckpointID):
        resolve_checkpoint_id(ckpt_(annotations=auto))
    assert resolve_checkpoint_id(ckpt_(annotations=auto, labels={names.LABEL_CHECKPOINT_ID: "a" * 32})) == "a" * 32
    recorded = ckpt_(labels={names.LABEL_CHECKPOINT_ID: "from-label"})
    recorded.status.identity_hash = "from-identity-hash"
    assert resolve_checkpoint_id(recorded) == "from-identity-hash"
    recorded.status.checkpoint_id = "from-status"
    assert resolve_checkpoint_id(recorded) == "from-status"
