"""ShardLoader contract: partition across ranks, equal batch counts, determinism, exact resume."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from pipeline.data.loader import ShardLoader
from pipeline.data.shards import random_chunks, write_shard_set

N_TRAIN, N_VAL, F = 1000, 37, 12


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """1000 train rows in 4 shards of row groups of 64 (16 row groups), 37 val rows."""
    out = str(tmp_path_factory.mktemp("shards"))
    chunks = itertools.chain(random_chunks(N_TRAIN, F, "train", chunk_rows=300, seed=1),
                             random_chunks(N_VAL, F, "val", seed=2))
    write_shard_set(out, [f"f{i}" for i in range(F)], chunks, rows_per_shard=256, row_group_rows=64)
    return out


def epoch_indices(loader):
    return [b["index"].numpy() for b in loader]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch_size,drop_last", [(32, False), (50, False), (7, False)])
def test_partition_across_simulated_ranks(shard_dir, world, batch_size, drop_last):
    loaders = [ShardLoader(shard_dir, "train", rank=r, world_size=world, batch_size=batch_size,
                           seed=3, drop_last=drop_last, shuffle_row_groups=3) for r in range(world)]
    for epoch in (0, 1):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            per_rank.append(epoch_indices(loader))
        # equal batch count on every rank, and equal to len()
        assert {len(batches) for batches in per_rank} == {len(loaders[0])}
        seen = np.concatenate([np.concatenate(b) for b in per_rank])
        pad = (-N_TRAIN) % world
        assert pad <= world - 1
        assert len(seen) == N_TRAIN + pad
        # union is the whole split; duplicates only from the documented padding
        assert set(seen.tolist()) == set(range(N_TRAIN))
        counts = np.bincount(seen, minlength=N_TRAIN)
        assert counts.max() <= 2 and (counts == 2).sum() == pad
        # the padded entries are the epoch order's own first `pad` entries
        order = loaders[0].epoch_order(epoch)
        assert sorted(np.flatnonzero(counts == 2).tolist()) == sorted(order[:pad].tolist())


def test_batches_carry_the_right_rows_and_dtypes(shard_dir):
    loader = ShardLoader(shard_dir, "val", batch_size=10, with_ohlc=True)
    assert len(loader) == 4 and loader.num_samples == N_VAL
    assert loader.feature_names == [f"f{i}" for i in range(F)]
    batches = list(loader)
    b = batches[0]
    assert b["features"].dtype == torch.float32 and b["features"].shape == (10, 105, F)
    assert b["valid"].dtype == torch.bool and b["valid"].shape == (10, 105)
    for key in ("label", "expansion_start", "expansion_end", "index"):
        assert b[key].dtype == torch.int64 and b[key].shape == (10,)
    assert [len(x["index"]) for x in batches] == [10, 10, 10, 7]
    # compare with the generator's rows: same features and labels for the same index
    (_, cols), = list(random_chunks(N_VAL, F, "val", seed=2))
    for batch in batches:
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(batch["features"].numpy(), cols["features"][idx])
        np.testing.assert_array_equal(batch["valid"].numpy(), cols["valid"][idx])
        np.testing.assert_array_equal(batch["label"].numpy(), cols["label"][idx])
        np.testing.assert_array_equal(batch["expansion_end"].numpy(), cols["expansion_end"][idx])
        np.testing.assert_array_equal(batch["ohlc"].numpy(), cols["ohlc"][idx])


def test_order_is_deterministic_in_seed_and_epoch_and_shuffled_across_shards(shard_dir):
    def run(seed, epoch):
        loader = ShardLoader(shard_dir, "train", batch_size=100, seed=seed)
        loader.set_epoch(epoch)
        return np.concatenate(epoch_indices(loader))

    a = run(0, 0)
    np.testing.assert_array_equal(a, run(0, 0))
    assert not np.array_equal(a, run(0, 1))
    assert not np.array_equal(a, run(1, 0))
    assert sorted(a.tolist()) == list(range(N_TRAIN))
    # the first batch mixes rows of several shards (shards hold 256 consecutive indices)
    assert len(set((a[:100] // 256).tolist())) >= 2


def test_resume_at_batch_k_yields_the_remaining_batches(shard_dir):
    def make():
        return ShardLoader(shard_dir, "train", rank=1, world_size=3, batch_size=16, seed=7)

    full = make()
    full.set_epoch(2)
    expected = epoch_indices(full)

    k = 5
    first = make()
    first.set_epoch(2)
    it = iter(first)
    head = [next(it)["index"].numpy() for _ in range(k)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == k

    resumed = make()  # a fresh process after a restart
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop calls this again; it must not rewind
    rest = epoch_indices(resumed)
    assert len(rest) == len(expected) - k
    for got, want in zip(head + rest, expected):
        np.testing.assert_array_equal(got, want)
    # the next epoch starts from its beginning
    resumed.set_epoch(3)
    assert resumed.state_dict()["batches_consumed"] == 0
    assert len(epoch_indices(resumed)) == len(expected)


def test_resume_state_must_match_the_loader(shard_dir):
    loader = ShardLoader(shard_dir, "train", world_size=2, batch_size=16)
    state = loader.state_dict()
    other = ShardLoader(shard_dir, "train", world_size=3, batch_size=16)
    with pytest.raises(Exception, match="world_size"):
        other.load_state_dict(state)


def test_drop_last_gives_only_full_batches(shard_dir):
    loader = ShardLoader(shard_dir, "train", world_size=3, batch_size=64, drop_last=True)
    sizes = [len(b["index"]) for b in loader]
    assert sizes == [64] * (334 // 64) and len(loader) == len(sizes)


def test_reader_holds_about_one_block_of_row_groups(shard_dir, monkeypatch):
    """Streaming: the row-group cache never exceeds a block plus the groups a batch straddles."""
    loader = ShardLoader(shard_dir, "train", batch_size=32, shuffle_row_groups=2)
    reads, peak = [], []
    original = loader._read_row_group
    live: set = set()

    def tracking(g):
        reads.append(g)
        return original(g)

    monkeypatch.setattr(loader, "_read_row_group", tracking)
    original_gather = loader._gather

    def gather(idx, rgs, cache):
        out = original_gather(idx, rgs, cache)
        live.clear()
        live.update(cache)
        peak.append(len(cache))
        return out

    monkeypatch.setattr(loader, "_gather", gather)
    assert sum(len(b["index"]) for b in loader) == N_TRAIN
    assert sorted(reads) == list(range(16))  # each row group read exactly once per epoch
    assert max(peak) <= 2 * 2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 120), world=st.integers(1, 4), batch=st.integers(1, 20),
       rg_rows=st.integers(1, 16), block=st.integers(1, 4), seed=st.integers(0, 3),
       drop_last=st.booleans())
def test_partition_property(tmp_path_factory, n, world, batch, rg_rows, block, seed, drop_last):
    """Any split size, world, batch and row-group layout: equal batch counts per rank, every
    sample once plus at most world-1 padding repeats (drop_last only drops a rank's tail)."""
    out = str(tmp_path_factory.mktemp("p"))
    write_shard_set(out, ["a"], random_chunks(n, 1, "train", chunk_rows=7), rows_per_shard=2 * rg_rows + 1,
                    row_group_rows=rg_rows)
    loaders = [ShardLoader(out, "train", rank=r, world_size=world, batch_size=batch, seed=seed,
                           shuffle_row_groups=block, drop_last=drop_last) for r in range(world)]
    per_rank = [epoch_indices(loader) for loader in loaders]
    assert {len(b) for b in per_rank} == {len(loaders[0])}
    assert all(len(x) <= batch for b in per_rank for x in b)
    seen = np.concatenate([x for b in per_rank for x in b] or [np.zeros(0, np.int64)])
    pad = (-n) % world
    if drop_last:
        assert len(seen) == world * (((n + pad) // world) // batch) * batch
        assert np.bincount(seen, minlength=n).max() <= 1 + pad
    else:
        assert len(seen) == n + pad
        counts = np.bincount(seen, minlength=n)
        assert counts.min() >= 1 and counts.sum() - n == pad  # every sample, plus the padding
