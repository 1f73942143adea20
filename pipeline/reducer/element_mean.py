"""The DDP-exact masked mean: every valid element of the *global* batch counts once.

DDP averages gradients over ranks. If each rank returned its own mean, the result would be a
mean of means: a rank with 3 valid elements would count as much as one with 300. Instead each
rank returns

    local_sum * world_size / global_count

where global_count is all-reduced. Averaging over the W ranks then gives exactly
sum_global / global_count, the single-process mean over the concatenated batch (value and
gradient). The per-rank return value is therefore not the global mean itself; the mean over
ranks of it is.

Zero valid elements anywhere gives 0, but through `values`, so every parameter that produced
`values` still gets a (zero) gradient: DDP requires every parameter to take part in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> int:
    """World size when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def masked_sum_count(values: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the valid elements, their number as float64) on this rank: the sufficient
    statistics of a per-element mean. Sums and counts of disjoint batches add, so an epoch's
    mean is sum(sums) / sum(counts) over its steps and ranks, exact whatever the batching."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    mask = mask.to(torch.bool).expand_as(values)
    # where(), not values * mask: a NaN/inf on a masked bar must not leak into the sum.
    local_sum = torch.where(mask, values, torch.zeros_like(values)).sum()
    return local_sum, mask.sum().to(torch.float64)


def global_counts(counts: torch.Tensor) -> torch.Tensor:
    """Local element counts summed over ranks (one all-reduce for any number of tasks)."""
    if distributed_world() > 1:
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def rank_scaled_mean(local_sum: torch.Tensor, global_count: torch.Tensor) -> torch.Tensor:
    """local_sum * W / global_count: its mean over ranks is the global per-element mean.
    With no valid element local_sum is 0 and still connected to the graph."""
    return local_sum * (distributed_world() / global_count.clamp(min=1.0)).to(local_sum.dtype)


def element_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    local_sum, count = masked_sum_count(values, mask)
    return rank_scaled_mean(local_sum, global_counts(count))
