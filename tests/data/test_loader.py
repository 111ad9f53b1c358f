"""ddcolor.data.loader: coverage over ranks x workers, determinism, resume, filters, augmentation, errors, S3."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ddcolor.color import gray_rgb_from_l
from ddcolor.config import DataConfig
from ddcolor.data.loader import LabDataLoader, LabShardDataset, ShardError, _empty, build_dataloader, collate
from ddcolor.data.shards import SHARD_SCHEMA, decode_lab, encode_lab, split_for
from tests.helpers.images import make_random_images

SIZE = 32
ROWS = 48  # rows 0, 5, 10, ... are val; rows 3, 10, 17, ... are low colorfulness
SHARD_ROWS = (20, 16, 12)
ROW_GROUP = 4


def _split(i: int) -> str:
    return "val" if i % 5 == 0 else "train"


def _low(i: int) -> bool:
    return i % 7 == 3


def _sha(i: int) -> str:
    return hashlib.sha256(f"row-{i}".encode()).hexdigest()


def _rgb(i: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(i)
    blocks = rng.integers(0, 256, size=(size // 4, size // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1))


def write_dataset(root: Path, rows: int = ROWS, shard_rows=SHARD_ROWS, size: int = SIZE) -> dict[str, tuple]:
    """Write shards + manifest like ingestion does; return sha256 -> (index, split, low, L bytes, ab bytes)."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    truth, entries, first = {}, [], 0
    now = datetime.now(UTC)
    for s, count in enumerate(shard_rows):
        records = []
        for i in range(first, min(first + count, rows)):
            l_bytes, ab_bytes = encode_lab(_rgb(i, size))
            sha = _sha(i)
            truth[sha] = (i, _split(i), _low(i), l_bytes, ab_bytes)
            records.append(
                {
                    "sha256": sha,
                    "source_uri": f"mem://{i}.png",
                    "split": _split(i),
                    "height": size,
                    "width": size,
                    "L": l_bytes,
                    "ab": ab_bytes,
                    "colorfulness": 5.0 if _low(i) else 40.0 + i,
                    "low_colorfulness": _low(i),
                    "ingested_at": now,
                }
            )
        first += count
        rel = f"shards/part-{s:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(records, schema=SHARD_SCHEMA), root / rel, row_group_size=ROW_GROUP)
        data = (root / rel).read_bytes()
        splits = Counter(r["split"] for r in records)
        entries.append(
            {
                "path": rel,
                "rows": len(records),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "splits": {"train": splits["train"], "val": splits["val"]},
                "low_colorfulness": sum(r["low_colorfulness"] for r in records),
            }
        )
    manifest = {
        "format": "ddcolor-shards",
        "format_version": 1,
        "created_at": now.isoformat(),
        "config": {"size": size, "resize_mode": "resize", "val_fraction": 0.2, "min_colorfulness": 15.0},
        "shards": entries,
        "counts": {"rows": rows},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return truth


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple]]:
    root = tmp_path_factory.mktemp("lab")
    return root, write_dataset(root)


def _expected(truth, split="train", exclude_low=True) -> list[str]:
    return sorted(s for s, t in truth.items() if t[1] == split and not (exclude_low and t[2]))


def _shas(samples) -> list[str]:
    return [s["sha256"] for s in samples]


def _stored(truth, sha) -> tuple[np.ndarray, np.ndarray]:
    return decode_lab(truth[sha][3], truth[sha][4], SIZE, SIZE)


# --- samples -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])  # 4: samples are rows of one batch buffer
def test_samples_hold_the_stored_lab_and_the_gray_input_built_from_l(dataset_dir, batch_size):
    root, truth = dataset_dir
    samples = list(LabShardDataset(root, split="val", batch_size=batch_size))
    assert sorted(_shas(samples)) == _expected(truth, "val")
    for s in samples:
        assert s["gray_rgb"].shape == (3, SIZE, SIZE) and s["gray_rgb"].dtype == torch.float32
        assert s["l"].shape == (1, SIZE, SIZE) and s["ab"].shape == (2, SIZE, SIZE)
        lightness, ab = _stored(truth, s["sha256"])
        np.testing.assert_array_equal(s["l"].numpy(), lightness)
        np.testing.assert_array_equal(s["ab"].numpy(), ab)
        torch.testing.assert_close(s["gray_rgb"], gray_rgb_from_l(s["l"][None])[0], rtol=0, atol=1e-6)
        assert s["gray_rgb"].min() >= 0 and s["gray_rgb"].max() <= 1
        assert s["l"].min() >= 0 and s["l"].max() <= 100


def test_collate_stacks_and_passes_batch_buffers_through_without_a_copy(dataset_dir):
    root, _ = dataset_dir
    samples = list(LabShardDataset(root, split="val", batch_size=4))[:4]
    batch = collate(samples)
    assert batch["gray_rgb"].shape == (4, 3, SIZE, SIZE) and batch["ab"].shape == (4, 2, SIZE, SIZE)
    assert batch["sha256"] == _shas(samples)
    for key in ("gray_rgb", "l", "ab"):
        assert torch.equal(batch[key], torch.stack([s[key] for s in samples]))
    assert batch["l"].data_ptr() == samples[0]["l"].data_ptr()  # the buffer itself
    reordered = collate(samples[::-1])  # not one run of a buffer: stacked
    assert torch.equal(reordered["ab"], torch.stack([s["ab"] for s in samples[::-1]]))
    assert torch.equal(collate(samples[1:3])["l"], batch["l"][1:3])
    shared = _empty((3, 2, 4, 4), shared=True)  # what a DataLoader worker writes a batch into
    shared.copy_(torch.randn(3, 2, 4, 4))
    passed = collate([{"gray_rgb": t, "l": t, "ab": t, "sha256": "x"} for t in shared])["ab"]
    assert passed.data_ptr() == shared.data_ptr() and passed.is_shared() and torch.equal(passed, shared)


def test_val_is_in_manifest_order_and_not_augmented_every_epoch(dataset_dir):
    root, truth = dataset_dir
    ds = LabShardDataset(root, split="val", crop_size=16)
    first = list(ds)
    ds.set_epoch(3)
    again = list(ds)
    assert _shas(first) == _shas(again) == sorted(_shas(first), key=lambda s: truth[s][0])
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["ab"], b["ab"])
        lightness, ab = _stored(truth, a["sha256"])
        np.testing.assert_array_equal(a["l"].numpy(), lightness[:, 8:24, 8:24])  # center crop, no flip
        np.testing.assert_array_equal(a["ab"].numpy(), ab[:, 8:24, 8:24])


def test_low_colorfulness_rows_are_excluded_by_default_and_can_be_kept_or_rethresholded(dataset_dir):
    root, truth = dataset_dir
    assert sorted(_shas(LabShardDataset(root))) == _expected(truth)
    kept = LabShardDataset(root, exclude_low_colorfulness=False)
    assert sorted(_shas(kept)) == _expected(truth, exclude_low=False)
    assert len(kept) == len(_expected(truth, exclude_low=False))
    # stored colorfulness is 5 for low rows and 40 + i otherwise: a threshold of 60 also drops rows i < 20
    strict = LabShardDataset(root, min_colorfulness=60.0)
    assert sorted(_shas(strict)) == sorted(s for s in _expected(truth) if truth[s][0] >= 20)


# --- coverage, determinism -----------------------------------------------------------------------------------


def test_union_over_two_ranks_and_two_workers_is_every_row_exactly_once(dataset_dir):
    root, truth = dataset_dir
    expected = _expected(truth)
    assert len(expected) % 2 == 1  # so the even split has a remainder to handle
    seen, per_rank = [], []
    for rank in range(2):
        ds = LabShardDataset(root, rank=rank, world_size=2, drop_remainder=False, batch_size=3, shuffle_buffer=8)
        loader = LabDataLoader(ds, num_workers=2)
        got = [sha for batch in loader for sha in batch["sha256"]]
        # the loader yields the rank's planned order verbatim: worker batches interleave as planned
        assert got == [ds._sha[i].decode() for i in ds._order(0, 2, 3)]
        per_rank.append(len(got))
        seen += got
    assert sorted(seen) == expected  # exactly once: no duplicates, no gaps
    assert sorted(per_rank) == [len(expected) // 2, len(expected) // 2 + 1]


def test_even_split_gives_equal_counts_per_rank_and_reports_the_dropped_rows(dataset_dir):
    root, truth = dataset_dir
    expected = _expected(truth)
    for epoch in (0, 1):
        seen, counts = [], []
        for rank in range(2):
            ds = LabShardDataset(root, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            got = _shas(ds)
            counts.append(len(got))
            assert len(got) == len(ds) == len(expected) // 2
            seen += got
        plan = ds.plan()
        assert plan.rows == len(expected) and plan.rows_per_rank == (len(expected) // 2,) * 2
        assert len(plan.dropped) == 1 and len(set(seen)) == len(seen)
        assert sorted([*seen, *plan.dropped]) == expected
    single = LabShardDataset(root, world_size=1)
    assert sorted(_shas(single)) == expected and single.plan().dropped == ()


def test_order_is_fixed_by_seed_and_epoch_and_changes_across_epochs(dataset_dir):
    root, _ = dataset_dir
    ds = LabShardDataset(root, crop_size=16, shuffle_buffer=8)
    first = list(ds)
    again = list(ds)
    assert _shas(first) == _shas(again)
    assert all(torch.equal(a["ab"], b["ab"]) for a, b in zip(first, again, strict=True))  # same crops / flips
    ds.set_epoch(1)
    assert _shas(ds) != _shas(first)
    other = LabShardDataset(root, crop_size=16, shuffle_buffer=8, seed=1)
    assert _shas(other) != _shas(first)
    assert sorted(_shas(other)) == sorted(_shas(first))


# --- resume --------------------------------------------------------------------------------------------------


def test_resume_in_process_yields_exactly_the_rest_of_the_epoch(dataset_dir):
    root, _ = dataset_dir
    ds = LabShardDataset(root, crop_size=24, shuffle_buffer=8)
    ds.set_epoch(2)
    full = list(ds)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["position"] == 7
    fresh = LabShardDataset(root, crop_size=24, shuffle_buffer=8)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    fresh.set_epoch(2)  # the trainer's loop calls this; it keeps the resume position of the same epoch
    rest = list(fresh)
    assert _shas(rest) == _shas(full[7:])
    assert all(torch.equal(a["l"], b["l"]) for a, b in zip(rest, full[7:], strict=True))
    fresh.set_epoch(3)
    assert len(list(fresh)) == len(ds)  # the next epoch starts from 0


def test_resume_through_workers_and_onto_a_different_worker_count(dataset_dir):
    root, _ = dataset_dir
    cfg = DataConfig(size=SIZE, num_workers=2, seed=5)
    loader = build_dataloader(cfg, root, "train", batch_size=3, rank=1, world_size=2, epoch=1)
    full = [sha for batch in loader for sha in batch["sha256"]]
    assert len(full) == len(loader.dataset) and len(full) % 3 == 0  # full batches only for training
    it = iter(loader)
    consumed = [sha for _ in range(3) for sha in next(it)["sha256"]]
    state = loader.state_dict()
    del it
    assert consumed == full[:9] and state["position"] == 9 and state["num_workers"] == 2
    for workers in (2, 0):
        resumed = build_dataloader(cfg, root, "train", batch_size=3, rank=1, world_size=2, num_workers=workers)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        assert [sha for batch in resumed for sha in batch["sha256"]] == full[9:]
    with pytest.raises(ValueError, match="rank"):
        build_dataloader(cfg, root, "train", batch_size=3, rank=0, world_size=2, num_workers=0).load_state_dict(state)


# --- augmentation --------------------------------------------------------------------------------------------


def test_random_crop_and_flip_take_windows_of_the_stored_image(dataset_dir):
    root, truth = dataset_dir
    flipped = plain = 0
    for crop in (None, 16):
        for s in LabShardDataset(root, crop_size=crop, exclude_low_colorfulness=False):
            side = crop or SIZE
            assert s["gray_rgb"].shape == (3, side, side) and s["ab"].shape == (2, side, side)
            lightness, ab = _stored(truth, s["sha256"])
            got = s["ab"].numpy()
            windows = [
                (flip, top, left)
                for flip in (False, True)
                for top in range(SIZE - side + 1)
                for left in range(SIZE - side + 1)
                if np.array_equal((ab[:, :, ::-1] if flip else ab)[:, top : top + side, left : left + side], got)
            ]
            assert windows, s["sha256"]
            flip, top, left = windows[0]
            source = lightness[:, :, ::-1] if flip else lightness
            np.testing.assert_array_equal(s["l"].numpy(), source[:, top : top + side, left : left + side])
            if crop is None:
                flipped, plain = flipped + flip, plain + (not flip)
    assert flipped >= 5 and plain >= 5
    no_flip = LabShardDataset(root, hflip=False)
    for s in no_flip:
        np.testing.assert_array_equal(s["ab"].numpy(), _stored(truth, s["sha256"])[1])
    with pytest.raises(ValueError, match="smaller than crop_size 64"):
        next(iter(LabShardDataset(root, crop_size=64)))


# --- errors --------------------------------------------------------------------------------------------------


def test_a_corrupt_or_wrong_schema_shard_is_named_in_the_error(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, rows=12, shard_rows=(6, 6))
    bad = root / "shards" / "part-00001.parquet"
    good = bad.read_bytes()
    bad.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(ShardError, match=r"part-00001\.parquet") as err:
        LabShardDataset(root)
    assert err.value.shard.endswith("part-00001.parquet")

    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ShardError, match=r"part-00001\.parquet"):
        LabShardDataset(root)

    table = pq.read_table(root / "shards" / "part-00000.parquet").drop_columns(["ab"])
    pq.write_table(table.append_column("ab", pa.array(["x"] * 6)), bad)
    with pytest.raises(ShardError, match=r"part-00001.parquet: wrong shard schema: column 'ab' is string"):
        LabShardDataset(root)

    table = pq.read_table(root / "shards" / "part-00000.parquet")
    short = pa.array([v[:-1] for v in table.column("L").to_pylist()], pa.binary())
    pq.write_table(table.set_column(table.schema.get_field_index("L"), SHARD_SCHEMA.field("L"), short), bad)
    ds = LabShardDataset(root, split="train", exclude_low_colorfulness=False)
    with pytest.raises(ShardError, match=r"part-00001.parquet: corrupt row .* expected 1024 / 2048"):
        list(ds)

    bad.unlink()
    with pytest.raises(ShardError, match=r"part-00001\.parquet"):
        LabShardDataset(root)
    (root / "manifest.json").write_text("{}")
    with pytest.raises(ShardError, match=r"manifest\.json"):
        LabShardDataset(root)


def test_worker_errors_still_name_the_shard(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, rows=12, shard_rows=(6, 6))
    ds = LabShardDataset(root, exclude_low_colorfulness=False, batch_size=2)
    (root / "shards" / "part-00000.parquet").write_bytes(b"gone")  # after indexing
    with pytest.raises(ShardError, match=r"part-00000\.parquet"):
        list(LabDataLoader(ds, num_workers=1))


def test_reads_a_dataset_written_by_ingest(tmp_path):

    from ddcolor.data.ingest import ingest

    images = make_random_images(tmp_path / "raw", 12)
    images.append(tmp_path / "raw" / "gray.png")
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(images[-1])  # colorfulness 0: low
    cfg = DataConfig(size=SIZE, val_fraction=0.3, shard_rows=5, num_workers=0)
    report = ingest(tmp_path / "raw", tmp_path / "ds", cfg, num_workers=0)
    counts = json.loads((tmp_path / "ds" / "manifest.json").read_text())["counts"]
    assert report.ingested == counts["rows"] == 13 and counts["low_colorfulness"] == 1
    gray = hashlib.sha256(images[-1].read_bytes()).hexdigest()
    gray_split = split_for(gray, cfg.val_fraction)
    train = [
        sha for b in build_dataloader(cfg, tmp_path / "ds", "train", batch_size=1, num_workers=0) for sha in b["sha256"]
    ]
    val = build_dataloader(cfg, tmp_path / "ds", "val", batch_size=2, num_workers=0)
    val_shas = [sha for b in val for sha in b["sha256"]]
    assert gray not in train and (gray in val_shas) == (gray_split == "val")  # low colorfulness: out of training only
    assert len(train) == counts["train"] - (gray_split == "train") and len(val_shas) == counts["val"]
    assert next(iter(val))["gray_rgb"].shape == (min(2, counts["val"]), 3, SIZE, SIZE)


# --- S3 ------------------------------------------------------------------------------------------------------


def test_reads_the_same_samples_from_s3(dataset_dir, s3_env):
    import boto3

    root, truth = dataset_dir
    client = boto3.client("s3")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_env, f"datasets/lab/{path.relative_to(root).as_posix()}")
    uri = f"s3://{s3_env}/datasets/lab"
    local = list(LabShardDataset(root, crop_size=16, shuffle_buffer=8, rank=0, world_size=2))
    remote = list(LabShardDataset(uri, crop_size=16, shuffle_buffer=8, rank=0, world_size=2))
    assert _shas(remote) == _shas(local)
    assert all(torch.equal(a["ab"], b["ab"]) for a, b in zip(local, remote, strict=True))
    loader = build_dataloader(DataConfig(size=SIZE), uri, "val", batch_size=4, num_workers=2)
    assert sorted(sha for batch in loader for sha in batch["sha256"]) == _expected(truth, "val", exclude_low=False)
    with pytest.raises(ShardError, match=r"nothing-here/manifest\.json"):
        LabShardDataset(f"s3://{s3_env}/nothing-here")
