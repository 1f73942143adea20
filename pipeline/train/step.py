"""One optimisation step of the worker loop, eager or replayed from a CUDA graph.

At the batch sizes the users train with (32-256) a JadeCompact step is launch-bound on a GPU: the
kernels are tiny and the host spends longer issuing them than the device running them. Captured
as one CUDA graph (forward, backward, gradient clipping, a capturable fused AdamW step and the
loss sums), a step is one launch. `TrainStep` does that:

- The first `warmup` full batches train eagerly on a side stream (cuDNN autotuning, the
  allocator, the optimiser's lazily created state, DDP's bucket rebuild all happen there);
  these are real steps on real batches, as in PyTorch's whole-network capture recipe.
- The next full batch is copied into static input buffers and the step is captured on that same
  stream (capture runs nothing), then replayed once: that replay is the step for that batch.
- Every later full batch is copied into the static buffers (device to device, microseconds) and
  the graph replayed. A batch of another size (an epoch's smaller last batch) and a step that
  measures the gradient probe run eagerly with the same optimiser and the same loss sums.
  "Full" is decided on the *global* batch size, so under DDP every rank makes the same choice
  (a graphed collective must be launched by all ranks alike).

What has to be true inside the step for capture (and is, in this package): no host
synchronisation and no tensor made from Python values on the device (`element_mean`,
the reducer and the weightings are sync-free); the learning rate a device tensor that the
scheduler fills in place (`tensor_lr`); the optimiser `capturable`; the loss sums a device
tensor updated in place. bf16 autocast is entered inside the forward, so inside the capture.

Checkpoints stay portable: `portable_state` turns the tensor learning rates back into floats,
and `load_optimizer_state` restores the flags of the optimiser the run built (fused,
capturable, tensor lr), whatever machine wrote the checkpoint.

On a machine without CUDA the graph cannot be captured; `replay="eager"` (tests) keeps every
other part of the graphed schedule (warmup count, static buffers, the full-batch rule, the
eager fallbacks) and replays the recorded step function on the static buffers instead.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Callable

import torch

from pipeline.errors import UserError
from pipeline.reducer.multitask import LOSS_STATS

GRAPH_SETTINGS = ("auto", "on", "off")
# Test hook: "eager" makes a run without CUDA follow the graphed schedule, the recorded step
# replayed eagerly (the trainer forwards it to Ray's workers).
REPLAY_ENV = "MOOLA_GRAPH_REPLAY"
WARMUP_SINGLE = 3   # PyTorch's whole-network capture example warms up 3 iterations
WARMUP_DDP = 11     # DDP must run >= 11 eager iterations before capture (PyTorch CUDA notes)


def use_graphs(setting: str, device: torch.device, world: int) -> bool:
    """Whether this run captures its step: "on" wherever it can run (a CUDA device), "auto" on
    a single CUDA process only. Under DDP "auto" stays eager until a multi-GPU machine has
    checked graphed DDP against eager (bench/gpu_ddp.py): "on" opts in."""
    if setting not in GRAPH_SETTINGS:
        raise ValueError(f"train.cuda_graphs must be one of {GRAPH_SETTINGS}, got {setting!r}")
    if torch.device(device).type != "cuda" or setting == "off":
        return False
    return setting == "on" or world == 1


def graph_plan(setting: str, device, world: int, where: str) -> tuple[bool, str]:
    """(capture the step?, how to replay it: "cuda" or "eager") for a process on `device`;
    "on" where there is no GPU is one clear error naming `where` (the worker, or local mode)."""
    device = torch.device(device)
    if os.environ.get(REPLAY_ENV) == "eager" and device.type != "cuda":
        return setting != "off", "eager"
    if setting == "on" and device.type != "cuda":
        raise UserError(f"train.cuda_graphs is 'on' but {where} has no GPU: CUDA graphs need one "
                        f"(use 'auto' to capture only where there is one)")
    return use_graphs(setting, device, world), "cuda"


def make_optimizer(param_groups: list[dict], device: torch.device, graphs: bool) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters); capturable with device-tensor
    learning rates when the step is captured."""
    cuda = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(param_groups, fused=True if cuda else None,
                                  capturable=graphs and cuda)
    if graphs:
        tensor_lr(optimizer, device)
    return optimizer


def tensor_lr(optimizer: torch.optim.Optimizer, device) -> None:
    """Each group's lr as a 0-d float32 tensor on the device: a captured step reads the tensor,
    and the LR scheduler fills it in place (`_update_param_group_val`), so a changing rate
    reaches the graph without a new capture. `initial_lr` stays a float, so the scheduler
    computes each rate on the host in float64 and writes it with one fill."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", float(group["lr"]))
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int):
    """"constant" or "cosine" (to 0 over `total_steps`), both a LambdaLR of the step computed in
    closed form on the host (CosineAnnealingLR's recursive form would run in float32 on the
    device for tensor lrs and drift ~4e-4 over 200k steps). `needs_step`: whether the loop has
    to call step() at all (a constant rate does not)."""
    total = max(total_steps, 1)
    if kind == "cosine":
        factor = lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    else:
        factor = lambda s: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.needs_step = kind != "constant"
    return scheduler


def portable_state(state: dict) -> dict:
    """An optimiser or scheduler state_dict with every 0-d tensor hyperparameter (lr,
    initial_lr, base_lrs, _last_lr) as a float, so a checkpoint written by a graphed CUDA run
    loads anywhere. Parameter state (exp_avg, step) is left as it is."""
    def plain(value):
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return float(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    out = dict(state)
    if "param_groups" in out:  # optimiser
        out["param_groups"] = [{k: (v if k == "params" else plain(v)) for k, v in g.items()}
                               for g in out["param_groups"]]
    else:  # scheduler
        out = {k: plain(v) for k, v in out.items()}
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, device,
                         graphs: bool) -> None:
    """Load a checkpoint's optimiser state, keeping this run's own implementation flags.

    The flags go into the saved groups *before* loading: torch places each state tensor by the
    saved group's fused/capturable flags (a CPU-written checkpoint would otherwise leave `step`
    on the host under a fused CUDA optimiser)."""
    flags = {k: optimizer.defaults[k] for k in ("fused", "capturable", "foreach")
             if k in optimizer.defaults}
    optimizer.load_state_dict(dict(state, param_groups=[{**g, **flags}
                                                       for g in state["param_groups"]]))
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor) and not graphs:
            group["lr"] = float(group["lr"])
    if graphs:
        tensor_lr(optimizer, device)


class TrainStep:
    """forward -> (probe) -> backward -> clip -> optimizer.step -> project -> loss sums, on device.

    `loss_sums` (float64 [2, T]: per task, this rank's element-loss sum and element count)
    accumulates every step's statistics on the device; the loop zeroes or seeds it at an epoch's
    start and reads it once at the end, so the epoch's loss is a per-element mean whatever the
    batching. Clipping covers the network only: the weighting's log-variances keep their own
    gradient (0.5 - f exp(-s) L is O(1) per task and would take most of a 1.0 budget) and are
    projected into their range after each step (`Weighting.project_`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tasks,
                 grad_clip: float, device, graphs: bool = False, warmup: int = WARMUP_SINGLE,
                 replay: str = "cuda", stream=None, fallback: bool = False):
        self.model, self.optimizer, self.tasks = model, optimizer, list(tasks)
        self.grad_clip, self.device = grad_clip, torch.device(device)
        self.loss_sums = torch.zeros(2, len(self.tasks), dtype=torch.float64, device=self.device)
        multitask = getattr(model, "module", model)  # DDP keeps the real module under .module
        self.weighting = multitask.weighting
        own = {id(p) for p in self.weighting.parameters()}
        self.clipped = [p for p in model.parameters() if id(p) not in own]
        self.graphs, self.warmup, self.replay = graphs, warmup, replay
        # fallback: a step that synchronises with the host (so cannot be captured) trains on
        # eagerly with one warning instead of failing the run; "auto" asks for it, "on" does not.
        self.fallback = fallback
        if graphs and replay == "cuda" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.graph = None               # torch.cuda.CUDAGraph (or _EagerReplay) once captured
        self.static: dict | None = None  # the captured step's input buffers
        self.warmed = 0                  # eager full-batch steps taken before capture
        self.counts = {"eager": 0, "replayed": 0}
        # One side stream for warmup and capture (DDP is built on it too: see the loop).
        self.stream = stream if stream is not None else (
            torch.cuda.Stream(self.device) if graphs and self.device.type == "cuda" else None)

    # ------------------------------------------------------------------------------- step

    def __call__(self, batch: dict, global_size: int, full_size: int,
                 before_backward: Callable[[dict], None] | None = None) -> None:
        """One step on this rank's `batch`. `global_size`: the global batch it is a slice of;
        `full_size`: the configured global batch size (only full batches are graphed).
        `before_backward(losses)`: the gradient probe; such a step runs eagerly."""
        graphable = (self.graphs and before_backward is None and global_size == full_size
                     and self.model.training and (self.static is None or self._fits(batch)))
        if not graphable:
            self._eager(batch, before_backward)
        elif self.graph is not None:
            for k, v in self.static.items():
                v.copy_(batch[k], non_blocking=True)
            self.graph.replay()
            self.counts["replayed"] += 1
        elif self.warmed < self.warmup:
            last = self.warmed == self.warmup - 1
            syncs = self._on_side_stream(lambda: self._eager(batch, None), batch, check=last)
            self.warmed += 1
            if syncs:  # capture would fail, and a failed capture leaves CUDA in a broken state
                self._refuse(f"the step synchronises with the host ({syncs[0]})")
        else:
            self._capture(batch)

    def _eager(self, batch: dict, before_backward) -> None:
        total, losses, outputs = self.model(batch)
        if before_backward is not None:
            before_backward(losses)  # before backward: the probe reuses this forward's graph
        # After capture the gradients are the graph's static tensors: zero them in place so
        # p.grad stays the tensor the graph writes.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        total.backward()
        self._clip_and_step(outputs)
        self.counts["eager"] += 1

    def _clip_and_step(self, outputs: dict) -> None:
        if self.grad_clip > 0:  # foreach norm, no host sync (error_if_nonfinite is off)
            torch.nn.utils.clip_grad_norm_(self.clipped, self.grad_clip)
        self.optimizer.step()
        self.weighting.project_()
        self.loss_sums += outputs[LOSS_STATS]

    def _graph_body(self) -> None:
        total, _, outputs = self.model(self.static)
        total.backward()
        self._clip_and_step(outputs)

    def _replay_eagerly(self) -> None:
        # A replayed graph *writes* the gradients its capture allocated (they were None before
        # capture); eagerly, backward accumulates, so zero them first.
        self.optimizer.zero_grad(set_to_none=False)
        self._graph_body()

    # ---------------------------------------------------------------------------- capture

    def _capture(self, batch: dict) -> None:
        # Static inputs are ordinary allocations made before capture; each replay reads them.
        self.static = {k: v.clone() for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)  # backward in the capture allocates grads
        try:
            graph = self._record()
        except Exception as exc:  # noqa: BLE001 - any capture failure has the same remedy
            # After a failed capture the stream and the caching allocator are in an undefined
            # state (PyTorch's CUDAGraph::reset says so): stop here, with the way out.
            raise UserError(f"capturing the training step as a CUDA graph failed "
                            f"({_first_line(exc)}): set train.cuda_graphs: off") from exc
        self.graph = graph
        graph.replay()  # the capture ran nothing: this replay is the step for this batch
        self.counts["replayed"] += 1

    def _record(self):
        """The captured step: a CUDA graph, or the eager stand-in off CUDA."""
        if self.replay == "cuda":
            graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            # thread_local: Ray's and the feed's other threads may touch CUDA meanwhile.
            try:
                with torch.cuda.graph(graph, stream=self.stream,
                                      capture_error_mode="thread_local"):
                    self._graph_body()
            finally:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return graph
        return _EagerReplay(self._replay_eagerly)

    def _refuse(self, why: str) -> None:
        """Graphs cannot work for this step: eager from now on ("auto"), or one clear error."""
        if not self.fallback:
            raise UserError(f"train.cuda_graphs 'on': cannot capture the training step as a CUDA "
                            f"graph: {why}; use 'auto' (trains eagerly then) or 'off'")
        self.graphs = False
        print(f"warning: not using CUDA graphs: {why}; training eagerly "
              f"(train.cuda_graphs: off skips the check)", file=sys.stderr, flush=True)

    def _on_side_stream(self, fn, batch: dict, check: bool = False) -> list[str]:
        """Run fn on the warm-up stream; with `check`, under CUDA's sync debug mode, returning
        the host synchronisations it made (any one of them would break a capture). The step
        completes either way: "warn" mode only reports."""
        def run() -> list[str]:
            if check:
                return self._syncs_in(fn)
            fn()
            return []

        if self.stream is None:
            return run()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        for v in batch.values():
            v.record_stream(self.stream)  # the side stream uses the feed's memory too
        with torch.cuda.stream(self.stream):
            syncs = run()
        current.wait_stream(self.stream)
        return syncs

    def _syncs_in(self, fn) -> list[str]:
        """Messages of the host synchronisations `fn` makes (CUDA only; none off CUDA)."""
        if self.device.type != "cuda":
            fn()
            return []
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return [str(w.message).splitlines()[0] for w in caught
                if "synchroniz" in str(w.message).lower()]

    def _fits(self, batch: dict) -> bool:
        return batch.keys() == self.static.keys() and all(
            batch[k].shape == v.shape and batch[k].dtype == v.dtype for k, v in self.static.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class _EagerReplay:
    """Stand-in for torch.cuda.CUDAGraph where there is no CUDA: replays the recorded step
    function on the static buffers (the schedule and the buffer handling are what it checks)."""

    def __init__(self, body: Callable[[], None]):
        self.body = body

    def replay(self) -> None:
        self.body()
