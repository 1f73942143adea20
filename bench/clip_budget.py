"""How much of the 1.0 gradient-clipping budget the log-variances would take (issue 16).

Prints, along 200 AdamW steps of JadeCompact on one random batch, the gradient norm of the
network and of the uncertainty weighting's log-variances, and by how much a clip at 1.0 scales
the network's gradient when the log-variances share the budget (the old step) against the
network alone (the step now). Run: .venv/bin/python bench/clip_budget.py
"""
import torch
from pipeline.data.shards import random_chunks
from pipeline.model import JadeCompact, JadeConfig
from pipeline.reducer import LossConfig, MultiTaskModel, build_weighting
torch.manual_seed(0)
cfg = JadeConfig(n_features=12)
mt = MultiTaskModel(JadeCompact(cfg), build_weighting("uncertainty", cfg.tasks), LossConfig())
_, c = next(random_chunks(32, seed=0))
batch = {k: torch.as_tensor(c[k]) for k in ("features","valid","label","expansion_start","expansion_end")}
batch["valid"] = batch["valid"].bool()
opt = torch.optim.AdamW(mt.param_groups(1e-3, 0.01, None))
own = {id(p) for p in mt.weighting.parameters()}
for step in range(201):
    opt.zero_grad()
    total, losses, _ = mt(batch)
    total.backward()
    net = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in mt.parameters() if id(p) not in own and p.grad is not None]))
    lv = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in mt.weighting.parameters()]))
    both = (net**2 + lv**2).sqrt()
    if step in (0, 10, 50, 100, 200):
        print(f"step {step}: network grad norm {net:.3f}, log-variance grad norm {lv:.3f}; clip 1.0 on both scales the network by {min(1, 1/both):.3f}, on the network alone by {min(1, 1/net):.3f}")
    torch.nn.utils.clip_grad_norm_(mt.parameters(), 1.0)
    opt.step()
