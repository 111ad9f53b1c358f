"""Scale-out throughput: ingestion and colorize-archive on the local process pool, Dask and Ray, 1 and 2 workers.

    python bench/scale.py [--images 48] [--archive-images 12] [--size 256] [--workers 1,2] [--engines local,dask,ray]
                          [--json out.json]

Workloads (random-color photos written to a temporary folder; a random-init atto model for colorization):

    ingest    ``ddcolor.data.ingest.ingest`` of ``--images`` 64x48 PNGs into a fresh dataset (data.size = --size,
              data.shard_rows = 8, so that there are shards for every worker): hash jobs of 8 files, then one
              write-shard job per shard (decode, resize, Lab-encode, write the shard to DEST). local = its own
              process pool (``num_workers``); dask / ray = ``map_batches`` over the engine.
    archive   ``ddcolor.archive.colorize_archive`` of ``--archive-images`` PNGs at network input 256 (fp32) into a
              fresh folder: local = its process pool; dask / ray = ``map_batches`` of ``colorize_batch``.

Engines run the library's own batch functions through the engine's native API (``Client.map`` on a
``distributed.LocalCluster`` with one single-threaded worker process per worker; ``ray.remote`` on ``ray.init``
with ``num_cpus`` = workers), timed after the cluster is up; Prefect's per-task overhead (the flows submit the same
functions as tasks) is measured by bench/orchestration.py. Each configuration runs once after an untimed warm-up
run (imports, model load per worker process). On a shared machine the img/s swing; the ratios matter.

Also reported: bytes that travel through the driver per image (pickled jobs out + pickled results back, as the
engines pickle them), and the pickled size of one ingest hash job and one shard job when the dataset holds 10^3 and
10^6 rows (a job names the hash index instead of carrying the hashes), next to the size of the known-hash set a job
used to carry. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procstats import machine


class Counting:
    """Wraps a mapper: counts the pickled bytes of the jobs sent and the results returned (what crosses the driver)."""

    def __init__(self, mapper: Callable) -> None:
        self.mapper, self.sent, self.received = mapper, 0, 0

    def __enter__(self) -> Counting:  # keeps a pool mapper's processes up across the run's calls
        from ddcolor.fanout import mapper_session

        self._session = mapper_session(self.mapper)
        self._session.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._session.__exit__(*exc)

    def __call__(self, fn: Callable, jobs: Sequence) -> Iterator:
        self.sent += sum(len(pickle.dumps(job)) for job in jobs)
        for result in self.mapper(fn, jobs):
            self.received += len(pickle.dumps(result))
            yield result


def dask_mapper(client: Any) -> Callable:
    def run(fn: Callable, jobs: Sequence) -> Iterator:
        futures = client.map(fn, list(jobs), pure=False)
        for future in futures:  # in job order
            yield future.result()

    return run


def ray_mapper() -> Callable:
    import ray

    def run(fn: Callable, jobs: Sequence) -> Iterator:
        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(job) for job in jobs]
        for ref in refs:
            yield ray.get(ref)

    return run


def run_ingest(src: Path, dest: Path, size: int, mapper: Callable | None, workers: int) -> dict[str, float]:
    from ddcolor.config import DataConfig
    from ddcolor.data.ingest import ingest

    cfg = DataConfig(size=size, shard_rows=8, val_fraction=0.05)
    from ddcolor.fanout import ProcessPoolMapper

    counting = Counting(mapper or ProcessPoolMapper(workers))  # local: ingest's own default pool, counted
    start = time.perf_counter()
    report = ingest(src, dest, cfg, map_batches=counting, batch_size=8)
    seconds = time.perf_counter() - start
    assert report.ingested == report.inputs, report.summary()
    out = {"images": report.inputs, "seconds": seconds, "img_per_s": report.inputs / seconds}
    out["driver_bytes_per_image"] = (counting.sent + counting.received) / report.inputs
    return out


def run_archive(src: Path, out: Path, model: Path, mapper: Callable | None, workers: int) -> dict[str, float]:
    from ddcolor.archive import ColorizeSettings, colorize_archive

    # one torch thread per worker process: N workers = N cores (ingest workers do the same); per-core rates
    settings = ColorizeSettings(input_size=256, precision="fp32", device="cpu", torch_threads=1)
    counting = Counting(mapper) if mapper else None
    start = time.perf_counter()
    report = colorize_archive(
        src, out, str(model), settings=settings, map_batches=counting, workers=workers, batch_size=2
    )
    seconds = time.perf_counter() - start
    assert report.done == report.inputs, report.summary()
    result = {"images": report.inputs, "seconds": seconds, "img_per_s": report.inputs / seconds}
    if counting:
        result["driver_bytes_per_image"] = (counting.sent + counting.received) / report.inputs
    return result


def job_payloads(tmp: Path) -> dict[str, int]:
    """Pickled size of one 32-file hash job and one 1024-file shard job for a dataset of 10^3 and 10^6 rows, and of
    the hash sets a job would carry without the index."""
    from datetime import UTC, datetime

    from ddcolor.data.hash_index import HashIndex, write_hash_index
    from ddcolor.data.ingest_jobs import HashJob, ShardJob
    from ddcolor.data.prepare import PrepareParams

    out: dict[str, int] = {}
    uris = tuple(f"s3://ddcolor-data/raw/2026/batch-0042/IMG_{i:06d}.jpg" for i in range(1024))
    params = PrepareParams(256, "resize", 89_478_485, 0.05, 15.0)
    shard = ShardJob(
        "s3://ddcolor-data/shards",
        123,
        tuple((u, os.urandom(32).hex()) for u in uris),
        params,
        datetime.now(UTC),
        "host:1234",
    )
    for rows in (10**3, 10**6):
        hashes = [os.urandom(32).hex() for _ in range(rows)]
        name = Path(write_hash_index(str(tmp / f"ds-{rows}"), HashIndex.from_hex(hashes))).name
        index = f"s3://ddcolor-data/shards/hash-index/{name}"  # the URI a job names for a dataset on S3
        job = HashJob(uris[:32], index, "host:1234")
        out[f"hash_job_bytes_{rows}_rows"] = len(pickle.dumps(job))
        out[f"shard_job_bytes_{rows}_rows"] = len(pickle.dumps(shard))  # names no index: the same at any size
        out[f"old_known_set_bytes_{rows}_rows"] = len(pickle.dumps(frozenset(hashes)))
        out[f"index_file_bytes_{rows}_rows"] = 32 * rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--archive-images", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--engines", default="local,dask,ray")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

    from ddcolor.colorize import random_init_model
    from ddcolor.model.checkpoint import save_checkpoint
    from tests.helpers.images import make_random_images  # the checkout root is on sys.path (above)

    results: dict[str, Any] = {"machine": machine(), "cores": len(os.sched_getaffinity(0)), "runs": []}
    with tempfile.TemporaryDirectory(prefix="ddcolor-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        results["payload"] = job_payloads(tmp)
        print(json.dumps(results["payload"], indent=1), flush=True)
        make_random_images(tmp / "raw", args.images)
        make_random_images(tmp / "scans", args.archive_images, start_seed=9000)
        model = save_checkpoint(random_init_model("atto", 0, warn=False), tmp / "model.safetensors")
        counter = iter(range(10**6))
        for engine in args.engines.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                cleanup: Callable[[], None] = lambda: None  # noqa: E731
                if engine == "local":
                    mapper = None
                elif engine == "dask":
                    from distributed import Client, LocalCluster

                    cluster = LocalCluster(
                        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
                    )
                    client = Client(cluster)
                    mapper = dask_mapper(client)

                    def cleanup(client=client, cluster=cluster) -> None:
                        client.close()
                        cluster.close()
                elif engine == "ray":
                    import ray

                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                    mapper = ray_mapper()
                    cleanup = ray.shutdown
                else:
                    raise SystemExit(f"unknown engine {engine}")
                try:
                    for workload in ("ingest", "archive"):
                        for timed in (False, True):  # untimed warm-up first
                            n = next(counter)
                            if workload == "ingest":
                                r = run_ingest(tmp / "raw", tmp / f"ds-{n}", args.size, mapper, workers)
                            else:
                                r = run_archive(tmp / "scans", tmp / f"out-{n}", model, mapper, workers)
                            if timed:
                                row = {"engine": engine, "workers": workers, "workload": workload, **r}
                                results["runs"].append(row)
                                print(json.dumps(row), flush=True)
                finally:
                    cleanup()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\n{results['machine']}, {results['cores']} cores")
    print("| workload | engine | workers | img/s | driver bytes/img |")
    print("|---|---|---:|---:|---:|")
    for r in results["runs"]:
        print(
            f"| {r['workload']} | {r['engine']} | {r['workers']} | {r['img_per_s']:.2f} | "
            f"{r.get('driver_bytes_per_image', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
