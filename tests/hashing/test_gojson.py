"""Our Go-compatible JSON against the real Go encoding/json, byte for byte (tests/hashing/gocheck)."""

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from dynamo_snapshot.hashing import GoStruct, dgd_checkpoint_id, identity_hash_input, marshal
from dynamo_snapshot.hashing.ids import _sha256_hex

GOCHECK = Path(__file__).parent / "gocheck"

TRICKY = ['"', "\\", "/", "<", ">", "&", "\u2028", "\u2029", "\n", "\r", "\t", "\b", "\f", "\x00", "\x01",
          "\x1f", "\x7f", "é", "ß", "日", "🚀", "\ufeff", "a", "Z", " ", "0"]


def _random_string(rng: random.Random) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 12)))


def _random_float(rng: random.Random) -> float:
    return rng.choice([
        rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30),
        float(rng.randint(-10**6, 10**6)),
        rng.choice([0.1, 1e-6, 9.99e-7, 1e21, 9.99e20, 1e20, 123456789.125, -0.000001, 5e-324, 1.7976931348623157e308]),
    ])


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return _random_string(rng)
    if kind == 1:
        return _random_float(rng)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return _random_string(rng) + "x"
    if kind == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_string(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


@pytest.fixture(scope="module")
def go_marshal(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: cannot compare with the real encoding/json")
    binary = tmp_path_factory.mktemp("gocheck") / "gocheck"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOWORK": "off"}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GOCHECK, check=True, env=env, timeout=300)

    def run(requests: list[dict]) -> list[tuple[bytes, str]]:
        text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in requests)
        out = subprocess.run([str(binary)], input=text, capture_output=True, text=True, check=True).stdout
        return [(bytes.fromhex(enc), digest) for enc, digest in (line.split() for line in out.splitlines())]

    return run


def test_random_values_match_go(go_marshal):
    rng = random.Random(20261128)
    values = [_random_value(rng) for _ in range(2000)]
    answers = go_marshal([{"kind": "value", "value": v} for v in values])
    for value, (go_bytes, _) in zip(values, answers, strict=True):
        assert marshal(value) == go_bytes, value


def test_identity_hashes_match_go(go_marshal):
    rng = random.Random(7)
    identities = []
    for _ in range(300):
        ident = {"model": _random_string(rng), "backendFramework": rng.choice(["vllm", "sglang", "trtllm"])}
        if rng.random() < 0.5:
            ident["dynamoVersion"] = rng.choice(["", "0.5.0", _random_string(rng)])
        if rng.random() < 0.5:
            ident["tensorParallelSize"] = rng.randint(0, 8)
        if rng.random() < 0.5:
            ident["pipelineParallelSize"] = rng.randint(0, 8)
        if rng.random() < 0.5:
            ident["dtype"] = rng.choice(["", "bfloat16", _random_string(rng)])
        if rng.random() < 0.5:
            ident["maxModelLen"] = rng.choice([0, 1, 4096, 131072])
        if rng.random() < 0.5:
            ident["extraParameters"] = {_random_string(rng): _random_string(rng) for _ in range(rng.randint(0, 4))}
        identities.append(ident)
    answers = go_marshal([{"kind": "identity", "value": i} for i in identities])
    for ident, (go_bytes, go_digest) in zip(identities, answers, strict=True):
        assert identity_hash_input(ident) == go_bytes, ident
        assert _sha256_hex(go_bytes) == go_digest


def test_dgd_ids_match_go(go_marshal):
    rng = random.Random(11)
    cases = [
        (rng.choice(["", "ns", _random_string(rng)]), _random_string(rng) or "d", rng.choice(["", "uid-1"]),
         _random_string(rng) or "c", rng.choice(["", "hash-1", "abcd1234"]))
        for _ in range(200)
    ]
    requests = [
        {"kind": "dgd", "value": {"namespace": n, "dgdName": d, "dgdUID": u, "componentName": c, "workerHash": w}}
        for n, d, u, c, w in cases
    ]
    for (n, d, u, c, w), (_, go_digest) in zip(cases, go_marshal(requests), strict=True):
        assert dgd_checkpoint_id(n, d, u, c, w) == go_digest[:32]


def test_struct_fields_keep_declaration_order():
    assert marshal(GoStruct(("z", 1), ("a", {"y": 1, "b": 2}))) == b'{"z":1,"a":{"b":2,"y":1}}'


def test_unsupported_values_are_refused():
    with pytest.raises(ValueError):
        marshal(float("nan"))
    with pytest.raises(TypeError):
        marshal({1: "x"})
