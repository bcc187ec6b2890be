"""Named pipeline presets: what targets compose and users edit by name.

``--passes`` takes preset names beside pass names (``--passes float,qdq``); a preset expands in place.
A target builds its pipeline from presets (:meth:`quadc.targets.Target.pipeline`) and a user edits it
with :class:`~quadc.passes.pipeline.PassPipeline` (``insert_pass``, ``remove_passes``,
``set_options``).

=========  =====================================================================================
preset     passes
=========  =====================================================================================
cleanup    ``const-fold, dce``: fold constant and shape subgraphs, drop dead nodes
float      ``lora-inputs`` then ``cleanup``: the float LoRA-as-input graph
qdq        ``quant-plan, qdq-insert``: calibrate and plan the shared encodings, insert Q/DQ
npu        ``linear-to-conv, mha-split, conv-act-fusion, scale-fold, transpose-cancel, cleanup``:
           the phone-NPU form (1x1 convs on ``[B, C, 1, S]``, per-head attention, fused
           activations, scales in the weights); runs after ``float`` and before ``qdq``
=========  =====================================================================================
"""

from __future__ import annotations

PRESETS: dict[str, tuple[str, ...]] = {
    "cleanup": ("const-fold", "dce"),
    "float": ("lora-inputs", "cleanup"),
    "qdq": ("quant-plan", "qdq-insert"),
    "npu": ("linear-to-conv", "mha-split", "conv-act-fusion", "scale-fold", "transpose-cancel", "cleanup"),
}


def expand(names: list[str] | tuple[str, ...], _seen: tuple[str, ...] = ()) -> list[str]:
    """Pass names with every preset name replaced by its passes (recursively)."""
    out: list[str] = []
    for name in names:
        if name in PRESETS:
            if name in _seen:
                raise ValueError(f"preset {name!r} includes itself")
            out.extend(expand(PRESETS[name], (*_seen, name)))
        else:
            out.append(name)
    return out
