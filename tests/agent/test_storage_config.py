"""The agent's ``storage`` configuration: PVC by default; ``type: s3`` with a bucket, prefix, endpoint,
TLS and credentials from the environment or a mounted Secret; every bad value refused naming its field
(exit code 2); an agent so configured uploads to and fetches from a real S3 server (MinIO)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.service import config, main
from dynamo_snapshot.agent.service.storageconfig import Credentials, S3Storage, credentials
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster import minio
from tests.agent.test_object_storage import HERE, _files, make_version

CACHE = "cache:\n  dir: /var/lib/dynamo-snapshot/cache\n  budgetGiB: 100\n"  # required with s3
S3 = CACHE + "storage:\n  type: s3\n  s3:\n"


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynamo_snapshot import logs

    monkeypatch.setattr(logs, "configure", lambda *_args, **_kw: None)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_storage_is_the_pvc_unless_the_config_asks_for_s3(tmp_path: Path):
    assert config.load(None).storage.type == names.STORAGE_TYPE_PVC
    assert config.load(write(tmp_path, "storage:\n  type: pvc\n  s3: {bucket: kept-from-values}\n")).storage.s3 is None
    text = S3 + ("    bucket: ckpts\n    prefix: /fleet/a/\n    endpoint: https://s3.example:9000/\n"
                 "    region: eu-west-1\n    forcePathStyle: true\n    caBundle: /etc/ca/ca.pem\n"
                 "    concurrency: 16\n    partMiB: 64\n")
    s3 = config.load(write(tmp_path, text)).storage.s3
    assert s3 == S3Storage(bucket="ckpts", prefix="fleet/a", endpoint="https://s3.example:9000", region="eu-west-1",
                           force_path_style=True, ca_bundle="/etc/ca/ca.pem", concurrency=16, part_mib=64)
    assert s3.url("ck1") == "s3://ckpts/fleet/a/ck1"


@pytest.mark.parametrize("text, complaint", [
    ("storage:\n  type: oci\n", r"storage.type: 'oci' is not one of pvc, s3"),
    ("storage:\n  type: s3\n", r"storage.s3.bucket: '' is not a bucket name .* required with storage.type s3"),
    (S3 + "    bucket: My_Bucket\n", r"storage.s3.bucket: 'My_Bucket' is not a bucket name"),
    (S3 + "    bucket: b1b\n    bukcet: x\n", r"storage.s3: unknown keys bukcet"),
    (S3 + "    bucket: b1b\n    prefix: a/../b\n", r"storage.s3.prefix: 'a/../b' is not a key prefix"),
    (S3 + "    bucket: b1b\n    endpoint: s3.example\n", r"storage.s3.endpoint: expected http\(s\)://host"),
    (S3 + "    bucket: b1b\n    forcePathStyle: 'yes'\n", r"storage.s3.forcePathStyle: expected bool"),
    (S3 + "    bucket: b1b\n    caBundle: ca.pem\n", r"storage.s3.caBundle: expected an absolute path"),
    (S3 + "    bucket: b1b\n    caBundle: /ca.pem\n    insecureSkipTLSVerify: true\n", r"caBundle or insecureSkip"),
    (S3 + "    bucket: b1b\n    partMiB: 1\n", r"storage.s3.partMiB: must be 5-5120"),
    ("storage: [s3]\n", r"storage: expected a mapping"),
    ("storage:\n  type: s3\n  s3: {bucket: b1b}\n", r"cache.dir: required with storage.type s3 - a restore fetches"),
    ("cache: {dir: /c}\nstorage:\n  type: s3\n  s3: {bucket: b1b}\n", r"cache.budgetGiB: must be set too"),
])
def test_a_wrong_storage_setting_is_refused_naming_the_field(tmp_path: Path, text: str, complaint: str):
    with pytest.raises(config.ConfigError, match=complaint):
        config.load(write(tmp_path, text))


def test_a_bad_storage_setting_stops_the_agent_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, S3 + "    bucket: b1b\n    caBundle: /no/such/ca.pem\n")
    with pytest.raises(SystemExit) as exited:
        main.main(["--node-name=n", "--namespace=ns", f"--config={path}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "storage.s3.caBundle /no/such/ca.pem" in err and "Traceback" not in err


def test_credentials_come_from_the_mounted_secret_or_the_environment_or_the_cloud_identity(tmp_path: Path):
    s3 = S3Storage(bucket="b1b")
    env = {names.ENV_S3_ACCESS_KEY_ID: "AK", names.ENV_S3_SECRET_ACCESS_KEY: "SK"}
    assert credentials(s3, env) == Credentials("AK", "SK")
    assert credentials(s3, {}) == Credentials()  # the pod's cloud identity (IRSA, instance metadata)
    with pytest.raises(config.ConfigError, match=r"AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"):
        credentials(s3, {names.ENV_S3_ACCESS_KEY_ID: "AK"})
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / names.ENV_S3_ACCESS_KEY_ID).write_text("FK\n")
    (secret / names.ENV_S3_SECRET_ACCESS_KEY).write_text("FS")
    mounted = S3Storage(bucket="b1b", credentials_directory=str(secret))
    assert credentials(mounted, env) == Credentials("FK", "FS")  # the Secret wins over the environment
    with pytest.raises(config.ConfigError, match=r"storage.s3.credentialsDirectory: /nowhere is not a directory"):
        credentials(S3Storage(bucket="b1b", credentials_directory="/nowhere"), env)


def test_an_s3_agent_serves_every_namespace_and_refuses_pod_mount(tmp_path: Path):
    path = write(tmp_path, S3 + "    bucket: b1b\n    endpoint: http://127.0.0.1:1\n")
    parser = main.build_parser()
    options = main.options_from(parser.parse_args(["--node-name=n", f"--config={path}"]), parser)
    assert options.watched_namespace is None and options.remote is not None  # no namespace's PVC to keep to
    assert options.remote.checkpoint_url("ck1") == "s3://b1b/ck1"
    restricted = parser.parse_args(["--node-name=n", "--namespace=a", "--namespace-restricted", f"--config={path}"])
    assert main.options_from(restricted, parser).watched_namespace == "a"
    with pytest.raises(SystemExit):
        main.options_from(parser.parse_args(["--node-name=n", "--storage-access-mode=podMount",
                                             f"--config={path}"]), parser)


def test_an_agent_configured_for_s3_uploads_under_its_prefix_and_fetches_the_version_verified(
        minio_server: minio.Minio, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dynamo_snapshot.agent.artifact import authn

    authn.create_key(tmp_path / "keys", "k1")
    keyring = authn.Keyring.from_directory(tmp_path / "keys")
    version = make_version(tmp_path / "made", keyring)
    monkeypatch.setenv(names.ENV_S3_ACCESS_KEY_ID, minio_server.user)
    monkeypatch.setenv(names.ENV_S3_SECRET_ACCESS_KEY, minio_server.password)
    path = write(tmp_path, S3 + f"    bucket: {bucket}\n    prefix: team-a\n    endpoint: {minio_server.endpoint}\n"
                 f"    region: {minio.REGION}\n    forcePathStyle: true\n    partMiB: 5\n")
    parser = main.build_parser()
    remote = main.options_from(parser.parse_args(["--node-name=n", f"--config={path}"]), parser).remote
    assert remote is not None
    anyio.run(remote.upload, version, "ck1", "1", keyring)
    status, _ = minio_server.head(f"/{bucket}/team-a/ck1/versions/1/{names.MANIFEST_FILE}")
    assert status == 200
    cache = NodeCache(tmp_path / "cache", 1 << 30)
    pinned, _ = anyio.run(remote.fetch, cache, "ck1", "1", keyring, HERE)
    pinned.close()
    assert _files(pinned.path) == _files(version)


def test_an_s3_agent_refuses_a_node_cache_inside_the_directory_it_writes_checkpoints_in(tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "cache: {dir: /var/lib/ds/objects/cache, budgetGiB: 10}\n"
                 "storage:\n  type: s3\n  s3: {bucket: b1b}\n")
    with pytest.raises(SystemExit) as exited:
        main.main(["--node-name=n", "--storage-base-path=/var/lib/ds/objects", f"--config={path}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "cache.dir: /var/lib/ds/objects/cache overlaps --storage-base-path" in err
