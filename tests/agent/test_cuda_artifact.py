"""The artifact side of GPU checkpoints: per-chunk digests of large page images (hashed and verified
in parallel) and the compatibility rules for CUDA state (driver release, GPU models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact import verification
from dynamo_snapshot.agent.errors import ArtifactIncompatible, ArtifactInvalid

CHUNK = 64 << 10


def make(base: Path, compatibility: artifact.Compatibility, threads: int = 4) -> tuple[Path, dict]:
    layout = artifact_layout.ArtifactLayout(base, "gpu")
    staging = layout.new_staging()
    (staging / "pages-1.img").write_bytes(os.urandom(5 * CHUNK + 123))
    (staging / "core-1.img").write_bytes(b"core")
    fields = {"checkpointID": "gpu", "compatibility": compatibility.to_json()}
    manifest = artifact.write_manifest(staging, fields, io_threads=threads, chunk_bytes=CHUNK)
    return layout.promote(staging), manifest


def node(driver: str | None = "580.159.04", models: tuple[str, ...] = ("NVIDIA H200",)) -> artifact.Compatibility:
    uuids = tuple(f"GPU-{i:08d}-0000-0000-0000-000000000000" for i in range(len(models)))
    return artifact.Compatibility("4.2.1", "6.18.44", "x86_64", driver, uuids, models)


def test_large_files_get_one_digest_per_chunk_whatever_the_thread_count(tmp_path: Path) -> None:
    _, parallel = make(tmp_path / "a", node(), threads=8)
    entry = next(f for f in parallel["files"] if f["path"] == "pages-1.img")
    assert entry["chunkBytes"] == CHUNK and len(entry["chunkSha256"]) == 6 and "sha256" not in entry
    assert next(f for f in parallel["files"] if f["path"] == "core-1.img")["sha256"]
    single = artifact_layout.ArtifactLayout(tmp_path / "b", "gpu").new_staging()
    pages = tmp_path / "a" / "gpu" / "versions" / "1" / "pages-1.img"
    (single / "pages-1.img").write_bytes(pages.read_bytes())
    again = artifact.write_manifest(single, {}, io_threads=1, chunk_bytes=CHUNK)
    assert again["files"][0]["chunkSha256"] == entry["chunkSha256"]


@pytest.mark.parametrize("threads", [1, 8])
def test_a_flipped_byte_in_one_chunk_is_refused_naming_the_range(tmp_path: Path, threads: int) -> None:
    final, _ = make(tmp_path, node())
    data = bytearray((final / "pages-1.img").read_bytes())
    data[3 * CHUNK + 7] ^= 0x40
    (final / "pages-1.img").write_bytes(bytes(data))
    with pytest.raises(ArtifactInvalid, match=rf"pages-1\.img has SHA-256 \w+ in bytes {3 * CHUNK}-{4 * CHUNK}"):
        verification.verify(final, "gpu", node(), io_threads=threads)


def test_a_chunk_list_that_does_not_fit_the_size_is_refused(tmp_path: Path) -> None:
    final, _ = make(tmp_path, node())
    with open(final / "pages-1.img", "ab") as f:
        f.write(b"x" * CHUNK)
    with pytest.raises(ArtifactInvalid, match=r"pages-1\.img is"):
        verification.verify(final, "gpu", node())


def test_cuda_state_needs_the_same_driver_release(tmp_path: Path) -> None:
    final, _ = make(tmp_path, node())
    assert verification.verify(final, "gpu", node())
    with pytest.raises(ArtifactIncompatible, match=r"NVIDIA driver 580\.159\.04, this node has driver 575\.57\.08"):
        verification.verify(final, "gpu", node(driver="575.57.08"))
    with pytest.raises(ArtifactIncompatible, match="this node has no CUDA driver"):
        verification.verify(final, "gpu", node(driver=None, models=()))


def test_cuda_state_needs_gpus_of_the_recorded_models(tmp_path: Path) -> None:
    final, _ = make(tmp_path, node(models=("NVIDIA H200", "NVIDIA H200")))
    with pytest.raises(ArtifactIncompatible, match=r"needs GPUs this node lacks: 2 x NVIDIA H200 \(node has 1\)"):
        verification.verify(final, "gpu", node(models=("NVIDIA H200", "NVIDIA H100 80GB HBM3")))
    assert verification.verify(final, "gpu", node(models=("NVIDIA H200",) * 4))


def test_older_manifests_with_plain_gpu_uuids_still_read() -> None:
    old = {"criuVersion": "4.2.1", "kernel": "6.18", "architecture": "x86_64", "cudaDriverVersion": None,
           "gpus": ["GPU-00000000-0000-0000-0000-000000000000"]}  # fmt: skip
    parsed = artifact.Compatibility.from_json(old)
    assert parsed.gpus == ("GPU-00000000-0000-0000-0000-000000000000",) and parsed.gpu_models == ("",)
