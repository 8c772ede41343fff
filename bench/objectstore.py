"""Object storage throughput: ckptguard's upload and download-and-verify against plain boto3, same run.

    make bench-s3                                  # 256 MiB checkpoint, 5 interleaved repeats
    .venv/bin/python bench/objectstore.py --mib 16 --repeats 1   # a quick look

One moto server on 127.0.0.1 (tests/s3kit.py), one checkpoint written by CheckpointManager, and:

* upload: ckptguard's upload (every byte hashed on the way, compared with the manifest, then
  manifest and create-only marker) vs boto3's managed ``upload_file`` of the same files, one after
  the other as a script would. Target: ckptguard >= 0.9x boto3.
* direct save: ``CheckpointManager(url, storage_options={"mode": "direct"}).save`` of the same state
  (serialized from memory into the objects, hashed as sent, manifest, marker, listing check) vs
  the same ``upload_file`` of the files a local save wrote (the bytes are identical).
* download: ckptguard's download (hashed as it arrives, fsynced, committed locally through
  publish, re-verified) vs a plain streamed ``get_object`` of the same objects to files (with and
  without fsync, the durability every local checkpoint gets), and vs boto3's managed
  ``download_file`` (ranged parallel GETs).

The medians of interleaved repeats are compared, so drift of the machine hits both sides alike.
Writes bench/results/objectstore.json and prints a table. Exits 1 if the upload target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from ckptguard import CheckpointManager  # noqa: E402
from ckptguard.commit import remote_publish  # noqa: E402
from ckptguard.files.events import EventLog  # noqa: E402
from ckptguard.format.manifest import read_manifest  # noqa: E402
from ckptguard.s3.objectstore import ObjectStore  # noqa: E402
from s3kit import S3Server, new_run  # noqa: E402  (the tests' server kit: one way to run the server)

UPLOAD_TARGET = 0.9


def make_checkpoint(where: Path, mib: int) -> tuple[Path, dict[str, Any]]:
    """A checkpoint of about `mib` MiB, and its state: four equal tensors plus AdamW state (so ~1/3 model)."""
    per = max(1, mib * 2**20 // 4 // 3 // 4)  # float32 elements per tensor
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per)) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters())
    sum(p.sum() for p in model).backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(where) as mgr:
        return mgr.save(1, state).path, state


def timed(fn: Callable[[int], None], i: int) -> float:
    start = time.perf_counter()
    fn(i)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    server = S3Server()
    work = Path(tempfile.mkdtemp(prefix="ckptguard-bench-s3-"))
    try:
        os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
        os.environ.update(AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        runs = [new_run(server, f"run{i}") for i in range(args.repeats)]  # one per repeat: same name each
        run = runs[0]
        ckpt, state = make_checkpoint(work / "local", args.mib)
        direct = [
            CheckpointManager(
                new_run(server, f"direct{i}").url, storage_options={"mode": "direct", "local_dir": str(work / f"d{i}")}
            )
            for i in range(args.repeats)
        ]  # opened (access check, lease) before the clock starts
        manifest = read_manifest(ckpt)
        stores, client = [ObjectStore(r.url) for r in runs], server.client()
        files = sorted(manifest.files)
        prefix = run.url.removeprefix(f"s3://{run.bucket}/")

        def ours_up(i: int) -> None:
            remote_publish.upload(stores[i], ckpt, ckpt.name, manifest, fence=lambda: None)

        def boto_up(i: int) -> None:
            for rel in files:
                client.upload_file(str(ckpt / rel), run.bucket, f"{prefix}/boto-{i}/{rel}")

        def direct_save(i: int) -> None:
            direct[i].save(1, state)

        def ours_down(i: int) -> None:
            target = work / f"down-{i}"
            target.mkdir()
            (c,) = remote_publish.discover(stores[0])
            remote_publish.download(stores[0], c, target, EventLog(target))
            shutil.rmtree(target)

        def plain_down(i: int, fsync: bool = False) -> None:
            target = work / f"plain-{i}"
            for rel in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                body = client.get_object(Bucket=run.bucket, Key=f"{prefix}/boto-0/{rel}")["Body"]
                with open(target / rel, "wb") as fh:
                    while chunk := body.read(16 << 20):
                        fh.write(chunk)
                    if fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
            shutil.rmtree(target)

        def managed_down(i: int) -> None:
            target = work / f"managed-{i}"
            for rel in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                client.download_file(run.bucket, f"{prefix}/boto-0/{rel}", str(target / rel))
            shutil.rmtree(target)

        cases = {"ckptguard upload": ours_up, "boto3 upload_file": boto_up, "ckptguard direct save": direct_save}
        cases |= {"ckptguard download+verify": ours_down, "plain get_object": plain_down}
        cases |= {"plain get_object+fsync": lambda i: plain_down(i, fsync=True)}
        cases |= {"boto3 download_file": managed_down}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.repeats):
            for name, fn in cases.items():  # interleaved: each repeat runs every case once
                samples[name].append(timed(fn, i))
        for mgr in direct:
            mgr.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    mib = manifest.total_bytes / 2**20
    speed = {name: mib / statistics.median(s) for name, s in samples.items()}
    ratios = {
        "upload: ckptguard / boto3 upload_file": speed["ckptguard upload"] / speed["boto3 upload_file"],
        "direct save: ckptguard / boto3 upload_file": speed["ckptguard direct save"] / speed["boto3 upload_file"],
        "download+verify: ckptguard / plain get_object": speed["ckptguard download+verify"] / speed["plain get_object"],
        "download+verify: ckptguard / plain get_object+fsync": speed["ckptguard download+verify"]
        / speed["plain get_object+fsync"],
        "download+verify: ckptguard / boto3 download_file": speed["ckptguard download+verify"]
        / speed["boto3 download_file"],
    }
    print(f"checkpoint: {mib:.0f} MiB in {len(files)} files; medians of {args.repeats} interleaved repeats")
    for name, value in speed.items():
        print(f"  {name:<28} {value:8.1f} MiB/s")
    for name, value in ratios.items():
        print(f"  {name:<50} {value:5.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"mib": mib, "files": len(files), "samples_s": samples, "mib_per_s": speed, "ratios": ratios}
    (args.out / "objectstore.json").write_text(json.dumps(results, indent=2))
    met = ratios["upload: ckptguard / boto3 upload_file"] >= UPLOAD_TARGET
    print(f"upload target >= {UPLOAD_TARGET}x: {'met' if met else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
