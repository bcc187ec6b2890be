"""The two alignment objectives: per-layer reconstruction (``layer``) and whole-model distillation (``model``).

**layer** (:class:`LayerObjective`): for every slot the task adapts, rows ``x`` sampled at the LoRA layer's
input while the float graph runs with the task bound (calibration captures, :func:`capture_rows`). The
teacher is the float branch ``x @ down @ up`` of the original LoRA; the student is what the QDQ graph
computes there: ``x`` through its activation encoding, ``down``/``up`` through the shared LoRA encodings,
the branch's inner and output tensors through theirs. A row's loss is the squared error over the mean
squared teacher output of its slot, averaged over slots. No network runs: fast.

**model** (:class:`ModelObjective`): the teacher is the float LoRA-as-input graph with the original LoRA on
calibration feeds over the sampler timesteps (outputs computed once on onnxruntime), the student the
:class:`~quadc.align.quantsim.QuantSim` of the QDQ graph; a feed's loss is ``|s - target|^2 / norm`` with
the targets and norms :func:`quadc.align.api` gives (the task's effect, or the whole output). With
task examples (:mod:`quadc.align.data`) the diffusion loss ``|s(x_t) - eps*|^2 / |eps*|^2`` is added with
weight ``data_weight``.

Both keep a seeded ``val_fraction`` of their samples for validation (early stopping).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from quadc.align.fakequant import FakeQuant
from quadc.align.quantsim import LoRAFactors, QuantSim
from quadc.align.trainer import Objective
from quadc.errors import QuadcError
from quadc.lora.model import LoRA
from quadc.lora.pack import pack_task
from quadc.lora.slots import LoRASlot
from quadc.quant.affine import fake_quant
from quadc.quant.plan import QuantPlan

__all__ = ["LayerObjective", "ModelObjective", "capture_rows", "split_ids"]


def split_ids(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, validation)`` ids of ``n`` samples: a seeded shuffle, ``round(val_fraction * n)`` held out
    (none when ``n < 2``; then validation uses the training samples)."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    k = min(max(1, int(round(val_fraction * n))), n - 1) if n >= 2 and val_fraction > 0 else 0
    val, tr = sorted(order[:k]), sorted(order[k:])
    return tr, (val or tr)


def _grid_bounds(factors: LoRAFactors, plan: QuantPlan) -> list[tuple[torch.nn.Parameter, float, float]]:
    """Per factor, the raw-value interval its shared encoding represents: the grid ends over the multiplier
    that packing applies (``up``'s LoRA scale), in the order of :meth:`LoRAFactors.named_factors`."""
    out = []
    for module, kind, param, mult in factors.named_factors():
        slot = factors.slots[module]
        enc = plan.lora[slot.down_input if kind == "down" else slot.up_input]
        lo, hi = float(np.min(enc.grid_min)) / float(mult), float(np.max(enc.grid_max)) / float(mult)
        out.append((param, min(lo, hi), max(lo, hi)))
    return out


def _project(bounds: Sequence[tuple[torch.nn.Parameter, float, float]]) -> None:
    with torch.no_grad():
        for param, lo, hi in bounds:
            param.clamp_(lo, hi)


def _grid_groups(factors: LoRAFactors, plan: QuantPlan, lr: float) -> list[dict[str, Any]]:
    groups = []
    for module, kind, param, mult in factors.named_factors():
        slot = factors.slots[module]
        enc = plan.lora[slot.down_input if kind == "down" else slot.up_input]
        grid = float(np.mean(enc.scale)) / max(abs(float(mult)), 1e-30)
        groups.append({"params": [param], "lr": lr * grid})
    return groups


# ------------------------------------------------------------------------------------------------- layer
def _branch_nodes(graph: gs.Graph, slot: LoRASlot) -> tuple[str | None, str | None]:
    """Names of the LoRA branch's inner tensor (the down node's output) and its output (the up node's)."""
    down = next((n for n in graph.nodes if any(t.name == slot.down_input for t in n.inputs)), None)
    up = next((n for n in graph.nodes if any(t.name == slot.up_input for t in n.inputs)), None)
    mid = down.outputs[0].name if down is not None else None
    out = up.outputs[0].name if up is not None else None
    return mid, out


def _matrices(down: torch.Tensor, up: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed slot tensors as ``(D [features, r], U [r, d_out])`` with ``branch = rows @ D @ U``."""
    if layout == "conv":
        return down.reshape(down.shape[0], -1).T, up[:, :, 0, 0].T
    if layout == "channels":
        return down.T, up.T
    return down, up


def capture_rows(graph: gs.Graph, slots: Mapping[str, LoRASlot], lora: LoRA,
                 feeds: Sequence[Mapping[str, np.ndarray]], rows: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of every adapted slot's input (module -> ``[n, features]``) with ``lora`` bound, from a
    calibration run of the float ``graph`` (:func:`quadc.quant.calibrate.calibrate` captures)."""
    from quadc.quant.calibrate import calibrate
    from quadc.quant.task_calibration import lora_captures

    packed = {lora.name: pack_task(lora, slots)}
    capture, capture_tasks = lora_captures(graph, slots, packed)
    per_feed = max(1, -(-2 * rows // max(1, len(feeds))))
    ranges = calibrate(graph, feeds, packed, include_base=False, capture=capture, capture_tasks=capture_tasks,
                       rows_per_feed=per_feed, max_rows=rows, seed=seed)
    return dict(ranges.samples.get(lora.name, {}))


class LayerObjective(Objective):
    """Per-slot reconstruction of the LoRA branch under the shared encodings (module docstring)."""

    def __init__(self, float_graph: gs.Graph, slots: Mapping[str, LoRASlot], plan: QuantPlan, lora: LoRA,
                 rows: Mapping[str, np.ndarray], *, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.factors = LoRAFactors(slots, lora)
        self.plan = plan
        self.slots = dict(slots)
        missing = [m for m in self.factors.modules_ if m not in rows or len(rows[m]) == 0]
        if missing:
            raise QuadcError(f"no captured inputs of LoRA layer '{missing[0]}' for task '{lora.name}'")
        original = pack_task(lora, slots)
        self._x: list[torch.Tensor] = []
        self._ref: list[torch.Tensor] = []
        self._energy: list[float] = []
        self._fq: list[tuple[FakeQuant, FakeQuant, FakeQuant | None, FakeQuant | None]] = []
        for module in self.factors.modules_:
            slot = self.slots[module]
            x = np.asarray(rows[module], np.float32)
            d0, u0 = _matrices(torch.from_numpy(original[slot.down_input]), torch.from_numpy(original[slot.up_input]),
                               slot.layout)
            ref = (torch.from_numpy(x).double() @ d0.double() @ u0.double()).float()
            x_enc = plan.activations.get(self._capture_name(float_graph, slot))
            self._x.append(torch.from_numpy(fake_quant(x, x_enc) if x_enc is not None else x))
            self._ref.append(ref)
            self._energy.append(max(float(ref.double().pow(2).sum(dim=1).mean()), 1e-30))
            mid, out = _branch_nodes(float_graph, slot)
            self._fq.append((FakeQuant.from_encoding(plan.lora[slot.down_input]),
                             FakeQuant.from_encoding(plan.lora[slot.up_input]),
                             FakeQuant.from_encoding(plan.activations[mid]) if mid in plan.activations else None,
                             FakeQuant.from_encoding(plan.activations[out]) if out in plan.activations else None))
        self.n_rows = max(len(x) for x in self._x)
        self.groups = [split_ids(self.n_rows, val_fraction, seed)]

    @staticmethod
    def _capture_name(graph: gs.Graph, slot: LoRASlot) -> str:
        node = next(n for n in graph.nodes if any(t.name == slot.down_input for t in n.inputs))
        return next(t.name for t in node.inputs if t.name != slot.down_input)

    def _apply(self, fn: Any, recurse: bool = True) -> LayerObjective:
        self._x = [fn(t) for t in self._x]
        self._ref = [fn(t) for t in self._ref]
        for fqs in self._fq:
            for fq in fqs:
                if fq is not None:
                    fq.scale, fq.zero_point = fn(fq.scale), fn(fq.zero_point)
        return super()._apply(fn, recurse)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return _grid_groups(self.factors, self.plan, lr)

    def project(self) -> None:
        _project(_grid_bounds(self.factors, self.plan))

    def forward(self, ids: Sequence[Sequence[int]], denoms: Sequence[int], step: int) -> torch.Tensor:
        packed = self.factors.packed()
        device = self._x[0].device
        total = torch.zeros((), device=device)
        wanted = torch.as_tensor(list(ids[0]), dtype=torch.int64)
        for i, module in enumerate(self.factors.modules_):
            slot = self.slots[module]
            rows = wanted[wanted < len(self._x[i])].to(device)
            if rows.numel() == 0:
                continue
            fq_d, fq_u, fq_mid, fq_out = self._fq[i]
            d, u = _matrices(fq_d(packed[slot.down_input]), fq_u(packed[slot.up_input]), slot.layout)
            h = self._x[i].index_select(0, rows) @ d
            if fq_mid is not None:
                h = fq_mid(h)
            y = h @ u
            if fq_out is not None:
                y = fq_out(y)
            err = (y - self._ref[i].index_select(0, rows)).pow(2).sum()
            total = total + err / self._energy[i]
        return total / (len(self.factors.modules_) * denoms[0])


# ------------------------------------------------------------------------------------------------- model
class ModelObjective(Objective):
    """Whole-network distillation of the QuantSim against float teacher outputs (module docstring)."""

    def __init__(self, sim: QuantSim, plan: QuantPlan, feeds: Sequence[Mapping[str, np.ndarray]],
                 targets: Sequence[np.ndarray], norms: Sequence[float], *, data: Any = None, data_weight: float = 0.0,
                 val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if sim.factors is None:
            raise QuadcError("the model objective needs a QuantSim with a LoRA")
        self.sim = sim
        self.plan = plan
        self._feeds = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in f.items() if k in sim.model_inputs}
                       for f in feeds]
        self._teacher = [torch.from_numpy(np.asarray(t, np.float32).reshape(-1)) for t in targets]
        self._norms = [float(n) for n in norms]
        self.data = data
        self.data_weight = float(data_weight)
        self.groups = [split_ids(len(self._feeds), val_fraction, seed)]
        if data is not None and len(data):
            self.groups.append(split_ids(len(data), val_fraction, seed + 1))

    def _apply(self, fn: Any, recurse: bool = True) -> ModelObjective:
        self._feeds = [{k: fn(v) if v.is_floating_point() else v for k, v in f.items()} for f in self._feeds]
        self._teacher = [fn(t) for t in self._teacher]
        return super()._apply(fn, recurse)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        assert self.sim.factors is not None
        return _grid_groups(self.sim.factors, self.plan, lr)

    def project(self) -> None:
        assert self.sim.factors is not None
        _project(_grid_bounds(self.sim.factors, self.plan))

    def _output(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.sim(feeds)
        return torch.cat([out[n].reshape(-1) for n in self.sim.net.output_names])

    def forward(self, ids: Sequence[Sequence[int]], denoms: Sequence[int], step: int) -> torch.Tensor:
        device = self._teacher[0].device
        total = torch.zeros((), device=device)
        for i in ids[0]:
            err = (self._output(self._feeds[i]) - self._teacher[i]).pow(2).sum()
            total = total + err / (self._norms[i] * denoms[0])
        if len(ids) > 1:
            for j in ids[1]:
                feeds, target = self.data.example(j, step)
                feeds = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
                tgt = torch.from_numpy(target.reshape(-1)).to(device)
                err = (self._output(feeds) - tgt).pow(2).sum() / tgt.pow(2).sum().clamp_min(1e-30)
                total = total + self.data_weight * err / denoms[1]
        return total
