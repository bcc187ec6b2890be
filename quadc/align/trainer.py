"""The training loop of alignment: Adam on one task's LoRA factors, early stopping, data-parallel ranks.

An objective (:class:`Objective`) has groups of samples (layer level: rows of the LoRA layers' inputs;
model level: calibration feeds and, with ``--data``, task examples), each split into training and
validation ids. A step draws ``batch`` training ids per group from a seeded shuffle (the same on every
rank), each rank takes every ``world``-th of them, and the objective returns
``sum over groups of (sum of its samples' losses) / (group batch size)``: summed over ranks that is the
loss of the whole batch. Gradients are averaged over ranks by ``torch.nn.parallel.DistributedDataParallel``
(so each rank's loss is scaled by ``world``), which makes one process and N processes take the same steps
up to float summation order.

**Distributed.** Under ``torchrun`` or ``accelerate launch`` (both set ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) :func:`init_distributed` joins the process group: NCCL
on CUDA, gloo on the CPU. Every rank prepares the same inputs (deterministic), trains its shard, and
only rank 0 writes files.

**Learning rate.** Adam's step is about ``lr`` in each parameter's own units, so the rate is given in
steps of the shared quantization grid: a factor whose packed tensor has scale ``s`` (``up``'s packed
tensor is ``multiplier * up``) gets ``lr * s / multiplier``. Moving a value across a grid step is what
alignment needs; the same ``lr`` suits every slot.

**Projection.** After every step (and before the first) each factor is clipped to the values its shared
encoding represents (``Objective.project``): a value beyond the grid only saturates in the artifact, so
clipping it changes nothing the graph computes, lets the clipped STE pass its gradient again, and keeps
the aligned file's float output consistent with what the graph computes.

**Early stopping.** The validation loss is measured before training and every ``eval_every`` steps;
training stops after ``patience`` measurements without a relative improvement of ``min_delta``, and the
factors of the best measurement are restored (the original LoRA when nothing improves).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quadc.context import silent_progress
from quadc.errors import QuadcError

__all__ = ["Objective", "TrainConfig", "TrainResult", "dist_info", "finish_distributed", "init_distributed", "train",
           "validation_loss"]


@dataclass(frozen=True)
class TrainConfig:
    """Options of one task's training (see the module docstring)."""

    steps: int = 200
    batch: int = 4
    lr: float = 0.1
    patience: int = 5
    eval_every: int | None = None
    min_delta: float = 1e-4
    seed: int = 0
    show_bar: bool = True

    def check(self) -> None:
        if self.steps < 0:
            raise QuadcError(f"--steps must be 0 or more, got {self.steps}")
        if self.batch < 1:
            raise QuadcError(f"--batch must be at least 1, got {self.batch}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise QuadcError(f"--lr must be a positive number, got {self.lr}")
        if self.patience < 1:
            raise QuadcError(f"--patience must be at least 1, got {self.patience}")


@dataclass
class TrainResult:
    """What training did: steps run, per-step training loss, (step, validation loss) pairs, the best."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    stopped_early: bool = False

    @property
    def initial_loss(self) -> float:
        return self.validation[0][1] if self.validation else math.nan

    @property
    def best_loss(self) -> float:
        return min((v for _, v in self.validation), default=math.nan)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "best_step": self.best_step, "stopped_early": self.stopped_early,
                "validation_loss": {"initial": _num(self.initial_loss), "best": _num(self.best_loss),
                                    "curve": [[s, _num(v)] for s, v in self.validation]},
                "train_loss": [_num(v) for v in self.losses]}


def _num(x: float) -> float | None:
    return float(f"{x:.6g}") if math.isfinite(x) else None


class Objective(torch.nn.Module):
    """Base of the alignment objectives: ``groups`` of ``(train ids, validation ids)`` and ``forward(ids,
    denoms, step)`` returning ``sum_g sum_{i in ids[g]} loss_i / denoms[g]``; ``param_groups(lr)`` gives
    the optimizer's groups (grid-relative rates)."""

    groups: list[tuple[list[int], list[int]]]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self) -> None:
        """Keep the parameters where the shared encodings can represent them (after every step)."""

    def state(self) -> list[torch.Tensor]:
        """Copies of the trainable parameters (to restore the best)."""
        return [p.detach().clone() for p in self.parameters() if p.requires_grad]

    def restore(self, state: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip([p for p in self.parameters() if p.requires_grad], state, strict=True):
                p.copy_(s)


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``: of the process group when one is initialized, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> torch.device:
    """Join the process group when launched by torchrun/accelerate (``WORLD_SIZE`` > 1) and return this
    rank's device (``cuda:LOCAL_RANK`` for ``device="cuda"``)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QuadcError(f"--device must be cpu or cuda, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuadcError("--device cuda was given but torch sees no CUDA device here; use --device cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def finish_distributed() -> None:
    """Wait for every rank and leave the process group (after training; a no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _Batches:
    """Endless seeded shuffles of one group's training ids, ``size`` at a time."""

    def __init__(self, ids: Sequence[int], size: int, seed: int) -> None:
        self.ids = list(ids)
        self.size = min(size, len(self.ids))
        self.rng = np.random.default_rng(seed)
        self.queue: list[int] = []

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.size:
            if not self.queue:
                self.queue = [self.ids[i] for i in self.rng.permutation(len(self.ids))]
            out.append(self.queue.pop(0))
        return out


def _shard(ids: Sequence[int], rank: int, world: int) -> list[int]:
    return list(ids[rank::world])


def validation_loss(objective: Objective) -> float:
    """The objective's validation loss now (summed over the data-parallel ranks)."""
    rank, world = dist_info()
    return _evaluate(objective, rank, world, -1)


def _evaluate(objective: Objective, rank: int, world: int, step: int) -> float:
    import torch.distributed as dist

    ids = [_shard(val, rank, world) for _, val in objective.groups]
    denoms = [max(1, len(val)) for _, val in objective.groups]
    with torch.no_grad():
        total = objective(ids, denoms, -1).detach().to(torch.float64).cpu()
    if world > 1:
        dist.all_reduce(total)
    return float(total)


def train(objective: Objective, config: TrainConfig, *, label: str = "",
          progress: Callable[[str], None] = silent_progress) -> TrainResult:
    """Train ``objective``'s parameters (see the module docstring); the best factors are left in place."""
    config.check()
    rank, world = dist_info()
    model: torch.nn.Module = objective
    if world > 1:
        device = next(objective.parameters()).device
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
    objective.project()
    optimizer = torch.optim.Adam(objective.param_groups(config.lr))
    batches = [_Batches(tr, config.batch, config.seed * 7919 + g) for g, (tr, _) in enumerate(objective.groups)]
    every = config.eval_every or max(1, config.steps // 20)
    result = TrainResult()
    best = _evaluate(objective, rank, world, 0)
    result.validation.append((0, best))
    best_state = objective.state()
    bad = 0
    bar = _bar(config.steps, label, config.show_bar and rank == 0)
    for step in range(1, config.steps + 1):
        picks = [b.next() for b in batches]
        ids = [_shard(p, rank, world) for p in picks]
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, [len(p) for p in picks], step)
        (loss * world).backward()
        optimizer.step()
        objective.project()
        value = float(loss.detach())
        if world > 1:
            import torch.distributed as dist

            total = loss.detach().to(torch.float64).cpu().reshape(1)
            dist.all_reduce(total)
            value = float(total)
        result.losses.append(value)
        result.steps = step
        if step % every == 0 or step == config.steps:
            val = _evaluate(objective, rank, world, step)
            result.validation.append((step, val))
            if val < best * (1.0 - config.min_delta):
                best, best_state, bad = val, objective.state(), 0
                result.best_step = step
            else:
                bad += 1
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4g}", val=f"{val:.4g}", best=f"{best:.4g}")
            if bar is None or bar.disable:
                progress(f"{label}: step {step}/{config.steps}, loss {value:.4g}, validation {val:.4g} "
                         f"(best {best:.4g})")
            if bad >= config.patience:
                result.stopped_early = step < config.steps
                if bar is not None:
                    bar.update(1)
                break
        elif bar is not None:
            bar.set_postfix(loss=f"{value:.4g}", best=f"{best:.4g}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    objective.restore(best_state)
    progress(f"{label}: {result.steps} steps, validation loss {result.initial_loss:.4g} -> {best:.4g} "
             f"(best at step {result.best_step}" + (", stopped early)" if result.stopped_early else ")"))
    return result


def _bar(total: int, label: str, show: bool) -> Any:
    if not show or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the align extra
        return None
    # disable=None: a bar on a terminal only; logs get the validation lines from ``progress`` instead.
    return tqdm(total=total, desc=label, file=sys.stderr, leave=True, dynamic_ncols=True, disable=None)
