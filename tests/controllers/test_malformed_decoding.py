"""Malformed DynamoCheckpoints and DGDs, without a cluster: each one either decodes, and then the planners
build its Job or ReplicaSet template without an exception, or is refused with an InvalidObject that names
a field path (what the operator writes into the object's status)."""

from __future__ import annotations

import re

import msgspec
import pytest

from dynamo_snapshot.api import (
    DynamoCheckpoint,
    DynamoGraphDeployment,
    InvalidObject,
    StorageAccessMode,
    convert,
    decode_dgd,
    malformed_of,
)
from dynamo_snapshot.controllers.checkpoint.ids import MissingAutoCheckpointID, resolve_checkpoint_id
from dynamo_snapshot.controllers.checkpoint.job import build_checkpoint_job
from dynamo_snapshot.controllers.dgd.plan import plan_component
from dynamo_snapshot.controllers.podshape import MissingContainer
from dynamo_snapshot.controllers.storage import Storage
from tests.controllers.malformed import base_checkpoint, base_dgd, generate

STORAGE = Storage(mode=StorageAccessMode.AGENT_MOUNT, pvc_name="snapshot-pvc", base_path="/checkpoints")
FIELD_PATH = re.compile(r"^(spec|metadata)(\.[A-Za-z0-9_-]+|\[[^\]]*\])*$")


def _with_namespace(obj):
    obj["metadata"] = {**obj["metadata"], "namespace": "ns", "uid": "u-1", "resourceVersion": "1"}
    return obj


def _plan(obj) -> None:
    if obj["kind"] == "DynamoCheckpoint":
        ckpt = convert(obj, DynamoCheckpoint)
        try:
            checkpoint_id = resolve_checkpoint_id(ckpt)
            build_checkpoint_job(ckpt, name="job", checkpoint_id=checkpoint_id, artifact_version="1",
                                 storage=STORAGE)
        except (MissingContainer, MissingAutoCheckpointID):
            pass
    else:  # as the DGD informer decodes it: a struct, or the Malformed stand-in naming the field
        raw = msgspec.json.encode(obj)
        try:
            dgd = decode_dgd(raw)
        except msgspec.ValidationError as err:
            stand_in = malformed_of(DynamoGraphDeployment)(raw, err)
            raise InvalidObject(stand_in.path, stand_in.problem) from None
        for component, service in dgd.spec.services.items():
            plan_component(dgd, component, service, get_checkpoint=lambda name: None, storage=STORAGE)


def test_the_valid_bases_decode_and_plan():
    _plan(_with_namespace(base_checkpoint("ok")))
    _plan(_with_namespace(base_dgd("ok")))


def test_600_malformed_objects_are_planned_or_refused_by_field_path():
    refused = 0
    for obj in generate(600, seed=15):
        _with_namespace(obj)
        try:
            _plan(obj)
        except InvalidObject as err:
            refused += 1
            assert FIELD_PATH.match(err.path), f"{obj['metadata']['name']}: {err}"
            assert err.problem
    assert refused > 300  # the generator mostly breaks what it touches


@pytest.mark.parametrize("kind", [DynamoCheckpoint, DynamoGraphDeployment])
def test_an_object_that_does_not_fit_is_cached_as_malformed_naming_the_field(kind):
    base = base_checkpoint("bad") if kind is DynamoCheckpoint else base_dgd("bad")
    if kind is DynamoCheckpoint:
        base["spec"]["job"]["podTemplateSpec"]["spec"]["containers"][0]["env"] = {"A": "1"}
        field = "spec.job.podTemplateSpec.spec.containers[0].env"
    else:
        base["spec"]["services"]["Worker"]["extraPodSpec"]["mainContainer"] = "x"
        field = "spec.services[Worker].extraPodSpec.mainContainer"
    raw = msgspec.json.encode(_with_namespace(base))
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.json.decode(raw, type=kind)
    stand_in = malformed_of(kind)(raw, err.value)
    assert stand_in.metadata.name == "bad" and stand_in.path == field
    assert stand_in.message.startswith(f"invalid {kind.__name__}: {field}: expected")
