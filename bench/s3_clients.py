"""Two S3 clients on the checkpoint's access pattern, against a real MinIO on loopback (hack/build-minio.sh).

    set       ``--files`` files of ``--mib`` MiB of random bytes (default 4 x 256 MiB = 1 GiB) in a temp dir
    upload    each file in multipart parts of ``--part-mib`` MiB, ``--concurrency`` parts in flight per file,
              all files at once (what ``objectstore.upload_version`` asks of ``S3Client.put_file``)
    download  every file as ranged GETs of ``--part-mib`` MiB, ``--concurrency`` in flight in all, each range
              hashed (SHA-256) as it lands, like ``objectstore.download_version``
    clients   obstore (``dynamo_snapshot.agent.artifact.s3``) and aiobotocore (multipart by hand, default
              checksums off: ``request_checksum_calculation=when_required``, so both move the same bytes)

    /work/main/.venv/bin/python bench/s3_clients.py [--files 4 --mib 256 --part-mib 32 --concurrency 8]

Prints one line per client and direction: seconds and MB/s (MiB/s). MinIO shares the machine's cores with the
client, so the figures bound the client's overhead rather than a network's speed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import anyio

from dynamo_snapshot.agent.artifact import s3
from dynamo_snapshot.devcluster import minio


def make_set(root: Path, files: int, mib: int) -> list[Path]:
    out = []
    for i in range(files):
        path = root / f"pages-{i}.img"
        with path.open("wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        out.append(path)
    return out


def ranges(size: int, part: int) -> list[tuple[int, int]]:
    return [(start, min(part, size - start)) for start in range(0, size, part)]


async def obstore_run(server: minio.Minio, bucket: str, paths: list[Path], part: int, conc: int) -> tuple[float, float]:
    client = s3.S3Client(s3.S3Settings(bucket=bucket, endpoint=server.endpoint, region=minio.REGION, path_style=True,
                                       access_key_id=server.user, secret_access_key=server.password,
                                       part_bytes=part, part_concurrency=conc))
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for p in paths:
            tg.start_soon(client.put_file, f"ob/{p.name}", p)
    up = time.perf_counter() - t0
    limiter = anyio.CapacityLimiter(conc)

    async def one(key: str, start: int, length: int) -> None:
        async with limiter:
            data = await client.get_range(key, start, length)
        await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).digest())

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for p in paths:
            for start, length in ranges(p.stat().st_size, part):
                tg.start_soon(one, f"ob/{p.name}", start, length)
    return up, time.perf_counter() - t0


async def botocore_run(server: minio.Minio, bucket: str, paths: list[Path], part: int, conc: int
                       ) -> tuple[float, float]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=max(16, conc * len(paths)),
                       request_checksum_calculation="when_required", response_checksum_validation="when_required")
    async with get_session().create_client(
            "s3", endpoint_url=server.endpoint, region_name=minio.REGION, aws_access_key_id=server.user,
            aws_secret_access_key=server.password, config=config) as client:

        async def put(p: Path) -> None:
            key = f"bc/{p.name}"
            upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
            limiter, parts = anyio.CapacityLimiter(conc), {}

            async def one(number: int, start: int, length: int) -> None:
                async with limiter:
                    body = await anyio.to_thread.run_sync(lambda: os.pread(fd, length, start))
                    got = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                                   PartNumber=number, Body=body)
                parts[number] = got["ETag"]

            fd = os.open(p, os.O_RDONLY)
            try:
                async with anyio.create_task_group() as tg:
                    for number, (start, length) in enumerate(ranges(p.stat().st_size, part), 1):  # noqa: ASYNC240
                        tg.start_soon(one, number, start, length)
            finally:
                os.close(fd)
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]})

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in paths:
                tg.start_soon(put, p)
        up = time.perf_counter() - t0
        limiter = anyio.CapacityLimiter(conc)

        async def get(key: str, start: int, length: int) -> None:
            async with limiter:
                resp = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
                async with resp["Body"] as body:
                    data = await body.read()
            await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).digest())

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in paths:
                for start, length in ranges(p.stat().st_size, part):
                    tg.start_soon(get, f"bc/{p.name}", start, length)
        return up, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--part-mib", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        root = Path(tmp)
        paths = make_set(root, args.files, args.mib)
        total = args.files * args.mib
        with minio.running(root / "minio") as server:
            bucket = server.create_bucket("bench")
            for rnd in range(args.rounds):
                for name, run in (("obstore", obstore_run), ("aiobotocore", botocore_run)):
                    up, down = anyio.run(run, server, bucket, paths, args.part_mib << 20, args.concurrency)
                    print(f"round {rnd} {name:12s} {total} MiB  upload {up:6.2f}s {total / up:7.1f} MiB/s  "
                          f"download+sha256 {down:6.2f}s {total / down:7.1f} MiB/s", flush=True)


if __name__ == "__main__":
    main()
