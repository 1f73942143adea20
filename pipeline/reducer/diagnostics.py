"""GradientProbe: is every task actually moving the shared encoder?

Every `every` steps it takes, for each task, the gradient of that task's *weighted* loss
(its term in the total) with respect to the shared encoder (LSTM + projection) and with
respect to the task's own head, using torch.autograd.grad(retain_graph=True) on the unwrapped
module's parameters. autograd.grad accumulates nothing into .grad and fires none of DDP's
hooks, so the training step's own backward (called afterwards) is unchanged.

Under torch.distributed the per-task gradient vectors are all-reduced (averaged, as DDP
averages) before taking norms, so the figures are those of the global batch, identical on
every rank. Without torch.distributed it is a plain local computation. With every=0 `step`
returns at once: no extra cost.

Figures per check:
- grad_norm[task]        ||d(weighted loss_task)/d(shared encoder)||
- grad_norm_head[task]   ||d(weighted loss_task)/d(own head)||
- grad_share[task]       grad_norm[task] / sum over tasks of grad_norm
- grad_ratio_countdown_pointer  grad_norm[countdown] / grad_norm[pointer] (the old pipeline
                                measured 0.18 and targeted ~1.0)
- starving               tasks whose share stayed below `starve_share` for
                         `starve_checks` consecutive checks (the worker loop passes the
                         run's `alarms.starve_share` and `alarms.starve_checks`).
The span and countdown heads read the per-bar LSTM output, so their shared gradient flows
only through the LSTM; the type and pointer heads reach it through the projection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.reducer.element_mean import distributed_world


def _unwrap(module):
    return getattr(module, "module", module)  # DDP keeps the real module under .module


class GradientProbe:
    def __init__(self, every: int = 0, starve_share: float = 0.05, starve_checks: int = 3):
        self.every = int(every)
        self.starve_share = float(starve_share)
        self.starve_checks = int(starve_checks)
        self.steps = 0
        self.below: dict[str, int] = {}
        self.last: dict | None = None

    def due(self) -> bool:
        return self.every > 0 and self.steps % self.every == 0

    def step(self, multitask, losses: dict[str, torch.Tensor]) -> dict | None:
        """Call once per training step, after the forward and before backward. Returns the
        new report on a probe step, else None."""
        if self.every <= 0:
            return None
        due = self.due()
        self.steps += 1
        return self.measure(multitask, losses) if due else None

    def measure(self, multitask, losses: dict[str, torch.Tensor]) -> dict:
        mt = _unwrap(multitask)
        model, tasks = mt.model, list(mt.tasks)
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        terms = mt.weighting.task_terms(losses)
        vectors = []
        for task in tasks:
            head = [p for p in model.head_parameters(task) if p.requires_grad]
            params = shared + head
            if params and terms[task].requires_grad:
                grads = torch.autograd.grad(terms[task], params, retain_graph=True,
                                            allow_unused=True)
            else:  # everything frozen, or a term that does not depend on the model
                grads = [None] * len(params)
            flat = [torch.zeros_like(p).flatten() if g is None else g.flatten()
                    for p, g in zip(params, grads)]
            n_shared = sum(p.numel() for p in shared)
            vec = torch.cat(flat) if flat else torch.zeros(0, device=terms[task].device)
            vectors.append((vec[:n_shared], vec[n_shared:]))
        shared_mat = torch.stack([v[0] for v in vectors]).detach()  # [T, n_shared]
        head_vecs = [v[1].detach() for v in vectors]
        world = distributed_world()
        if world > 1:  # one collective for everything: the global-batch gradient is the mean
            sizes = [h.numel() for h in head_vecs]
            packed = torch.cat([shared_mat.flatten(), *head_vecs])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed /= world
            shared_mat = packed[:shared_mat.numel()].view_as(shared_mat)
            head_vecs = list(torch.split(packed[shared_mat.numel():], sizes))
        norms = {t: float(shared_mat[i].norm()) for i, t in enumerate(tasks)}
        head_norms = {t: float(head_vecs[i].norm()) for i, t in enumerate(tasks)}
        total = sum(norms.values())
        shares = {t: (n / total if total > 0 else 0.0) for t, n in norms.items()}
        # No shared gradient at all (frozen encoder, a batch with no labels) says nothing
        # about balance: it neither counts toward nor clears a starving streak.
        if total > 0:
            for t in tasks:
                self.below[t] = self.below.get(t, 0) + 1 if shares[t] < self.starve_share else 0
        ratio = None
        if "countdown" in norms and "pointer" in norms:
            ratio = norms["countdown"] / norms["pointer"] if norms["pointer"] > 0 else float("inf")
        self.last = {"grad_norm": norms, "grad_norm_head": head_norms, "grad_share": shares,
                     "grad_ratio_countdown_pointer": ratio, "starving": self.starving()}
        return self.last

    def starving(self) -> list[str]:
        return sorted(t for t, n in self.below.items() if n >= self.starve_checks)

    def report(self) -> dict:
        """The latest check (empty figures before the first)."""
        if self.last is None:
            return {"grad_norm": {}, "grad_norm_head": {}, "grad_share": {},
                    "grad_ratio_countdown_pointer": None, "starving": []}
        return self.last

    def state_dict(self) -> dict:
        """What a resumed run continues: the step count, the starving streaks and the last
        check (an epoch's record reports it). The schedule and thresholds are configuration:
        a resumed run takes its own (`alarms.starve_share`, `alarms.starve_checks`)."""
        return {"steps": self.steps, "below": dict(self.below), "last": self.last}

    def load_state_dict(self, sd: dict) -> None:
        # Older checkpoints hold the probe's whole __dict__ (thresholds too): only the state
        # is taken from them.
        self.steps, self.below = int(sd["steps"]), dict(sd["below"])
        self.last = sd.get("last")
