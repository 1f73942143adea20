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
No Ray here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.manifest import WINDOW, load_manifest, manifest_uri, shard_uri, split_shards
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
        if fold is not None:  # TODO(issue 13): the fold's train / test block as the split
            raise UserError(f"fold {fold}: {uri} has no fold assignments yet")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.uri, self.split = str(uri), split
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.shuffle_row_groups = max(1, shuffle_row_groups)
        self.columns = COLUMNS + (["ohlc"] if with_ohlc else [])

        self.manifest = load_manifest(self.uri, verify=verify, splits=(split,))
        self.feature_names: list[str] = list(self.manifest["features"])
        self.n_features = len(self.feature_names)
        self.shards = split_shards(self.manifest, split, manifest_uri(self.uri))
        # One entry per row group of the split, in index order: (shard number, row group in it).
        rg_rows = [n for s in self.shards for n in s["row_group_rows"]]
        self._rg_shard = np.array([i for i, s in enumerate(self.shards) for _ in s["row_group_rows"]])
        self._rg_local = np.array([j for s in self.shards for j in range(len(s["row_group_rows"]))])
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
        self.num_samples = int(self._rg_start[-1])
        self.pad = (-self.num_samples) % world_size
        self.samples_per_rank = (self.num_samples + self.pad) // world_size
        self.epoch = 0
        self.batches_consumed = 0
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()

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
                "shuffle_row_groups": self.shuffle_row_groups}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size", "num_samples", "shuffle_row_groups"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"loader state has {key}={state[key]} but this loader has "
                                f"{getattr(self, key)}; resume with the same data and settings")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])

    # ---- order ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The padded global sample order of an epoch (split indices), identical on all ranks."""
        epoch = self.epoch if epoch is None else epoch
        n_rg = len(self._rg_start) - 1
        if not self.shuffle:
            order = np.arange(self.num_samples, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            rg_perm = rng.permutation(n_rg)
            blocks = []
            for b in range(0, n_rg, self.shuffle_row_groups):
                groups = rg_perm[b:b + self.shuffle_row_groups]
                idx = np.concatenate([np.arange(self._rg_start[g], self._rg_start[g + 1])
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
        first = int(self._rg_start[g])
        if arrays["index"][0] != first or arrays["index"][-1] != first + rows - 1:
            raise UserError(f"{uri}: row group {self._rg_local[g]} holds indices "
                            f"{arrays['index'][0]}..{arrays['index'][-1]}, expected "
                            f"{first}..{first + rows - 1}; rebuild the shards")
        return arrays

