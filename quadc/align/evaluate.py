"""Quality of a task under the shared encodings, measured on onnxruntime (the graphs, not the simulation).

For a task with original LoRA ``L`` and a candidate ``C`` (the same LoRA, or its aligned version), over
evaluation feeds (inputs used neither for calibration nor for alignment):

- **effect SQNR**: the task's own effect ``F(L) - F(base)`` of the float graph against ``Q(C) - Q(base)`` of
  the quantized graph (``base``: every LoRA input zero, i.e. the zero point);
- **output SQNR**: ``F(L)`` against ``Q(C)``;
- **float SQNR**: ``F(L)`` against ``F(C)``: how far the candidate's float output moved from the original's
  (an aligned LoRA must still do its task).

``F`` runs the float LoRA-as-input graph with the packed float tensors, ``Q`` the QDQ graph with the
packed tensors quantized under the shared encodings (:func:`quadc.lora.pack.quantize_task`), both through
:func:`quadc.align.workspace.session`. SQNRs are summed over all feeds and outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quadc.align.workspace import Workspace, session
from quadc.lora.model import LoRA
from quadc.lora.pack import pack_task, quantize_task
from quadc.quant.affine import sqnr_db

__all__ = ["Evaluator"]


def _flat(outputs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).reshape(-1) for run in outputs for o in run])


class Evaluator:
    """Float and quantized outputs of tasks on fixed feeds (see the module docstring)."""

    def __init__(self, ws: Workspace, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.ws = ws
        self.feeds = [dict(f) for f in feeds]
        self._float = session(ws.float_graph)
        self._quant = session(ws.qdq_graph)
        self._float_base = self.float_outputs(None)
        self._quant_base = self.quant_outputs(None)

    def _run(self, sess: Any, lora_feeds: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        names = {i.name for i in sess.get_inputs()}
        return [sess.run(None, {k: v for k, v in {**f, **lora_feeds}.items() if k in names}) for f in self.feeds]

    def float_outputs(self, lora: LoRA | None) -> list[list[np.ndarray]]:
        """Outputs of the float graph with ``lora`` bound (None: the base model), per feed."""
        return self._run(self._float, pack_task(lora, self.ws.float_slots))

    def quant_outputs(self, lora: LoRA | None) -> list[list[np.ndarray]]:
        """Outputs of the QDQ graph with ``lora`` stored under the shared encodings, per feed."""
        packed = quantize_task(pack_task(lora, self.ws.slots), self.ws.plan) if not self.ws.plan.lora_float_inputs \
            else pack_task(lora, self.ws.slots)
        return self._run(self._quant, packed)

    def scores(self, original: LoRA, candidate: LoRA | None = None) -> dict[str, float]:
        """``effect_sqnr_db``, ``output_sqnr_db`` and (for a candidate) ``float_sqnr_db``; see the module
        docstring. Without a candidate the original itself is scored; an exact match (infinite SQNR) is
        None."""
        ref = self.float_outputs(original)
        cand = candidate if candidate is not None else original
        test = self.quant_outputs(cand)
        ref_flat, test_flat = _flat(ref), _flat(test)
        out = {
            "effect_sqnr_db": sqnr_db(ref_flat - _flat(self._float_base), test_flat - _flat(self._quant_base)),
            "output_sqnr_db": sqnr_db(ref_flat, test_flat),
        }
        if candidate is not None:
            out["float_sqnr_db"] = sqnr_db(ref_flat, _flat(self.float_outputs(candidate)))
        # JSON has no infinity: an exact match (the anchor against itself) is None
        return {k: round(float(v), 4) if np.isfinite(v) else None for k, v in out.items()}
