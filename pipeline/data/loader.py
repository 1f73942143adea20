"""ShardLoader: exact, resumable, rank-partitioned batches from a sharded split.

Contract (DESIGN.md "Loader"): for (split, rank, world_size, seed, epoch)
- every rank yields the same number of batches (no DDP hang at the end of an epoch);
- over all ranks each sample of the split appears exactly once per epoch, except that the epoch
  order is padded with its own first `pad` entries (pad <= world_size - 1) so its length is a
  multiple of world_size;
- the order depends only on (seed, epoch), and `state_dict()` = (epoch, batches consumed)
  resumes exactly where an uninterrupted run would be.

Order: a block shuffle. Each epoch permutes the split's row groups (across all shards), cuts the
permuted list into blocks of `shuffle_row_groups` row groups, and permutes the samples within
each block; the epoch order is the concatenation of the blocks. Rank r then takes the r-th
contiguous 1/W of that order, so it reads only the row groups of its own blocks, and at any time
holds one block of decoded row groups (K x 4096 rows x 105 x F x 4 bytes: ~165 MB for K=8,
F=12; two blocks for the one batch that straddles a block boundary), whatever the size of the
split (bench/loader.py: ~700 MB peak RSS, torch included, for 100k and for 1M windows).
Shuffle quality trade-off: a batch mixes samples from K random row groups rather than from the
whole split. Shards are written in time order, so rows inside one row group are neighbours in
time; with K=8 a batch draws from 8 random stretches of the split, and which stretches meet
changes every epoch. Raise `shuffle_row_groups` for a better mix at the cost of memory
(K = number of row groups is a full uniform shuffle). Inside a batch the rows come grouped by
row group (which samples form a batch is fixed by the order above; their order inside the batch
does not matter to a mean loss, and grouping makes each column one np.take per row group).
Iterating an epoch that was already finished replays it; `set_epoch(e)` with a new `e` starts
that epoch from its first batch, and with the current epoch keeps a resumed position.

Batches: dict of torch tensors built from `np.frombuffer` views of the fixed_size_binary column
buffers and one numpy gather per (batch, row group): no per-sample Python work.

Folds (`fold=I`, pipeline/data/folds.py): "train" is fold I's train windows and "val" its test
block, both drawn from the shards of the splits the folds cover (train and val, their rows
concatenated in index order: the row space) through a row mask; "test" stays the whole test
split. The contract holds for the fold's windows: the block shuffle runs over the row groups
holding any of them, and `index` in a batch is the row's position in the row space (a train
shard row keeps its index, a val shard row is offset by the train rows), unique per window, so
merging val predictions by index keeps every window of a test block that spans both splits.
No Ray here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data import folds
from pipeline.data.manifest import (WINDOW, load_manifest, manifest_uri, shard_uri, split_shards,
                                    verify_shard)
from pipeline.data.shards import binary_view
from pipeline.errors import UserError

COLUMNS = ["index", "features", "valid", "label", "expansion_start", "expansion_end"]
DEFAULT_SHUFFLE_ROW_GROUPS = 8
# An open ParquetFile keeps its last row group's buffers (~20 MB at F=12), so keeping every
# shard open would make memory grow with the number of shards; a few stay open, the rest are
# closed and reopened (a footer read) when the shuffle comes back to them.
MAX_OPEN_SHARDS = 2


class ShardLoader:
    def __init__(self, uri: str, split: str, rank: int = 0, world_size: int = 1,
                 batch_size: int = 32, seed: int = 0, drop_last: bool = False,
                 shuffle: bool = True, shuffle_row_groups: int = DEFAULT_SHUFFLE_ROW_GROUPS,
                 with_ohlc: bool = False, verify: bool = True, fold: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.uri, self.split = str(uri), split
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.shuffle_row_groups = max(1, shuffle_row_groups)
        self.columns = COLUMNS + (["ohlc"] if with_ohlc else [])

        self.fold = fold
        self.manifest = load_manifest(self.uri, verify=False)
        read_splits, rows = folds.fold_rows(self.manifest, fold, split, self.uri)
        self.feature_names: list[str] = list(self.manifest["features"])
        self.n_features = len(self.feature_names)
        self.shards = [s for name in read_splits
                       for s in split_shards(self.manifest, name, manifest_uri(self.uri))]
        if verify:
            for shard in self.shards:
                verify_shard(self.uri, shard)
        self._index_row_groups(rows)
        self.num_samples = len(self._rows)
        if self.num_samples == 0:
            raise UserError(f"{uri}: fold {fold} has no {split} windows")
        self.pad = (-self.num_samples) % world_size
        self.samples_per_rank = (self.num_samples + self.pad) // world_size
        self.epoch = 0
        self.batches_consumed = 0
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()

    def _index_row_groups(self, rows: np.ndarray | None) -> None:
        """One entry per row group of the row space, in index order: its shard, its number in
        that shard, its first position, and the offset of its split's rows (0 for one split);
        then the samples (positions, sorted: all of them without a fold), the row groups that
        hold any, and where each row group's samples start in `_rows`."""
        rg_rows = [n for s in self.shards for n in s["row_group_rows"]]
        self._rg_shard = np.array([i for i, s in enumerate(self.shards) for _ in s["row_group_rows"]])
        self._rg_local = np.array([j for s in self.shards for j in range(len(s["row_group_rows"]))])
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
        split_offset, total = {}, 0
        for shard in self.shards:
            split_offset.setdefault(shard["split"], total)
            total += shard["rows"]
        self._rg_offset = np.array([split_offset[self.shards[i]["split"]] for i in self._rg_shard],
                                   np.int64)
        self._rows = np.arange(self._rg_start[-1], dtype=np.int64) if rows is None \
            else np.asarray(rows, np.int64)
        self._rg_rows_start = np.searchsorted(self._rows, self._rg_start)
        self._rg_used = np.flatnonzero(np.diff(self._rg_rows_start) > 0)

    # ---- contract -------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; a no-op when it is the current epoch (so a resumed state survives)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "split": self.split, "num_samples": self.num_samples,
                "shuffle_row_groups": self.shuffle_row_groups, "fold": self.fold}

    def load_state_dict(self, state: dict) -> None:
        for key in ("fold", "seed", "world_size", "batch_size", "num_samples",
                    "shuffle_row_groups"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"loader state has {key}={state[key]} but this loader has "
                                f"{getattr(self, key)}; resume with the same data and settings")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])

    # ---- order ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The padded global sample order of an epoch (positions in the row space: split indices
        without a fold), identical on all ranks."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            order = self._rows.copy()
        else:
            rng = np.random.default_rng([self.seed, epoch])
            used = self._rg_used
            rg_perm = used[rng.permutation(len(used))]
            blocks = []
            for b in range(0, len(used), self.shuffle_row_groups):
                groups = rg_perm[b:b + self.shuffle_row_groups]
                idx = np.concatenate([self._rows[self._rg_rows_start[g]:self._rg_rows_start[g + 1]]
                                      for g in groups])
                blocks.append(idx[rng.permutation(len(idx))])
            order = np.concatenate(blocks)
        # np.resize repeats the order cyclically: the first `pad` entries, even when the split
        # is smaller than the pad (a 1-sample val split on 3 ranks)
        return np.resize(order, self.num_samples + self.pad)

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's contiguous part of the epoch order."""
        start = self.rank * self.samples_per_rank
        return self.epoch_order(epoch)[start:start + self.samples_per_rank]

    # ---- reading ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n_batches = len(self)
        if self.batches_consumed >= n_batches:  # a finished epoch iterated again: replay it
            self.batches_consumed = 0
        order = self.rank_order()[:n_batches * self.batch_size if self.drop_last else None]
        rg_of = np.searchsorted(self._rg_start, order, side="right") - 1
        # Position of the last use of each row group, so it is freed as soon as it is done.
        last_use = np.full(len(self._rg_start) - 1, -1, dtype=np.int64)
        np.maximum.at(last_use, rg_of, np.arange(len(order)))
        cache: dict[int, dict[str, np.ndarray]] = {}
        first = self.batches_consumed
        for b in range(first, n_batches):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(order))
            batch = self._gather(order[lo:hi], rg_of[lo:hi], cache)
            for g in [g for g in cache if last_use[g] < hi]:
                del cache[g]
            self.batches_consumed = b + 1
            yield batch

    def _gather(self, idx: np.ndarray, rgs: np.ndarray, cache: dict) -> dict[str, torch.Tensor]:
        n = len(idx)
        out = {"features": np.empty((n, WINDOW, self.n_features), np.float32),
               "valid": np.empty((n, WINDOW), np.uint8),
               "label": np.empty(n, np.int64), "expansion_start": np.empty(n, np.int64),
               "expansion_end": np.empty(n, np.int64), "index": np.empty(n, np.int64)}
        if "ohlc" in self.columns:
            out["ohlc"] = np.empty((n, WINDOW, 4), np.float32)
        # Group the batch by row group (a stable sort: the batch holds the same samples, each
        # row group's rows contiguous), so each column is one np.take straight into the output.
        perm = np.argsort(rgs, kind="stable")
        idx, rgs = idx[perm], rgs[perm]
        groups, starts = np.unique(rgs, return_index=True)
        bounds = list(starts) + [n]
        for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            if g not in cache:
                cache[g] = self._read_row_group(int(g))
            local = idx[lo:hi] - self._rg_start[g]
            for key, arr in cache[g].items():
                np.take(arr, local, axis=0, out=out[key][lo:hi])
        tensors = {k: torch.from_numpy(v) for k, v in out.items()}
        tensors["valid"] = torch.from_numpy(out["valid"].view(np.bool_))
        return tensors

    def _shard_file(self, shard_no: int, uri: str) -> pq.ParquetFile:
        if shard_no in self._files:
            self._files.move_to_end(shard_no)
        else:
            self._files[shard_no] = pq.ParquetFile(storage.open_input(uri))
            while len(self._files) > MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
        return self._files[shard_no]

    def _read_row_group(self, g: int) -> dict[str, np.ndarray]:
        shard_no = int(self._rg_shard[g])
        uri = shard_uri(self.uri, self.shards[shard_no])
        try:
            table = self._shard_file(shard_no, uri).read_row_group(int(self._rg_local[g]),
                                                                   columns=self.columns)
        except UserError:
            raise
        except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid (a ValueError), IOError
            raise UserError(f"{uri}: cannot read row group {self._rg_local[g]}: "
                            f"{str(exc).splitlines()[0]}") from None
        rows = self.shards[shard_no]["row_group_rows"][int(self._rg_local[g])]
        if table.num_rows != rows:
            raise UserError(f"{uri}: row group {self._rg_local[g]} has {table.num_rows} rows, "
                            f"the manifest says {rows}; rebuild the shards")
        arrays = {
            "features": binary_view(table.column("features"), np.float32, (WINDOW, self.n_features)),
            "valid": binary_view(table.column("valid"), np.uint8, (WINDOW,)),
            "label": table.column("label").to_numpy().astype(np.int64),
            "expansion_start": table.column("expansion_start").to_numpy().astype(np.int64),
            "expansion_end": table.column("expansion_end").to_numpy().astype(np.int64),
            "index": table.column("index").to_numpy(),
        }
        if "ohlc" in self.columns:
            arrays["ohlc"] = binary_view(table.column("ohlc"), np.float32, (WINDOW, 4))
        first = int(self._rg_start[g] - self._rg_offset[g])
        if arrays["index"][0] != first or arrays["index"][-1] != first + rows - 1:
            raise UserError(f"{uri}: row group {self._rg_local[g]} holds indices "
                            f"{arrays['index'][0]}..{arrays['index'][-1]}, expected "
                            f"{first}..{first + rows - 1}; rebuild the shards")
        if self._rg_offset[g]:  # a val shard row of a fold: its position in the row space
            arrays["index"] = arrays["index"] + self._rg_offset[g]
        return arrays

