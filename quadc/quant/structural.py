"""Structural precision rules: activations that stay 16-bit whatever ``a8_fraction`` says.

Some tensors carry values whose every integer matters, and 8 bits round them away before any output error
could warn about it. :func:`protected_activations` names them, with the rule that holds each one:

- **timestep path** (``"timestep"``): the U-Net's ``timestep`` input and every tensor computed from it
  and from no other graph input (through constants, shapes and LoRA slot inputs only): the ``Cast``/``Expand``/``Mul``
  arguments of the sinusoidal embedding's ``Sin``/``Cos``, the embedding and the time MLP behind it, up to
  where it meets the sample. An 8-bit timestep rounds 0..999 to steps of about 4 and the embedding's high
  frequencies turn to noise that every resnet adds (issue 12: 22.4 dB instead of 38.5 dB output SQNR at
  ``a8_fraction=0.2`` on the trained fixtures). The tensors are tiny, so 16 bits there cost nothing.
  A target that computes the embedding on the host (the TFLite targets' ``host.onnx``) keeps it in float
  anyway; the rule only matters where the embedding runs on the accelerator.
- **index or shape** (``"index"``): a float tensor read where an operator takes indices, shapes, sizes or
  counts (``Gather`` indices, ``Reshape``/``Expand`` shape, ``Slice`` starts/ends/axes/steps, ``Resize``
  roi/scales/sizes, ``Pad`` pads, ``Tile`` repeats, ``Range``, ``ConstantOfShape``, ``OneHot``, ``TopK``
  k) or cast to an integer type: such values must stay exact.

Graphs that are not U-Nets (no input in the ``timestep`` role, :func:`quadc.unet_inputs.unet_input_roles`)
only get the index rule.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.unet_inputs import is_lora_input, unet_input_roles

__all__ = ["INDEX_INPUTS", "TIMESTEP", "INDEX", "protected_activations", "timestep_path"]

TIMESTEP = "timestep"
INDEX = "index"

#: Operator -> positions of its inputs that hold indices, shapes, sizes or counts (None: every input).
INDEX_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "ScatterND": (1,), "ScatterElements": (1,),
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3),
    "Upsample": (1,), "Pad": (1, 3), "ConstantOfShape": (0,), "Range": None, "OneHot": (0, 1), "TopK": (1,),
    "Unsqueeze": (1,), "Squeeze": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "Split": (1,),
}


def timestep_path(graph: gs.Graph) -> set[str]:
    """The timestep input and every node output that depends on it and on no other graph input
    (empty when the graph has no input in the U-Net's ``timestep`` role)."""
    try:
        timestep = unet_input_roles(graph).get("timestep")
    except QuadcError:
        return set()
    if timestep is None:
        return set()
    # LoRA slot inputs are weights bound per task, not data: they do not take a tensor off the path.
    others = {t.name for t in graph.inputs if t.name != timestep and not is_lora_input(t.name)}
    from_timestep = {timestep}
    from_others = set(others)
    for node in graph.nodes:  # graphs are kept topologically sorted
        names = [t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        data = [] if node.op in ("Shape", "Size") else names  # a shape is not the tensor's values
        outs = [o.name for o in node.outputs if o.name]
        if any(n in from_others for n in data):
            from_others.update(outs)
        if any(n in from_timestep for n in data):
            from_timestep.update(outs)
    return from_timestep - from_others


def _index_tensors(graph: gs.Graph) -> set[str]:
    found: set[str] = set()
    for node in graph.nodes:
        positions = INDEX_INPUTS.get(node.op, ())
        if node.op == "Cast":
            to = node.attrs.get("to")
            if to is not None and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to))).kind in "iub":
                positions = (0,)
            else:
                positions = ()
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Variable) and t.name and (positions is None or i in positions):
                found.add(t.name)
    return found


def protected_activations(graph: gs.Graph, names: Collection[str]) -> dict[str, str]:
    """``{tensor: rule}`` for each of ``names`` that must stay 16-bit (:data:`TIMESTEP` or :data:`INDEX`)."""
    wanted = set(names)
    rules = dict.fromkeys(sorted(timestep_path(graph) & wanted), TIMESTEP)
    for name in sorted(_index_tensors(graph) & wanted):
        rules.setdefault(name, INDEX)
    return rules
