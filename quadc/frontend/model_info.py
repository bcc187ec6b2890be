"""What the frontend knows about a U-Net graph: LoRA attachment points and attention blocks.

Module paths use the diffusers/PyTorch dotted form, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. They are the keys that LoRA files are
mapped onto.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttachPoint:
    """A linear or conv layer that a LoRA can attach to.

    ``kind`` is ``"linear"`` (MatMul or Gemm; weight stored as ``[d_in, d_out]`` for MatMul, or as in
    the Gemm's transB) or ``"conv"`` (Conv; weight ``[d_out, d_in, kh, kw]``). ``node`` is the name of the
    MatMul/Gemm/Conv node, ``weight`` the name of its weight initializer, ``bias`` the name of the
    bias initializer or Add constant if there is one. ``d_in``/``d_out`` are the layer's feature sizes;
    ``kernel`` is ``(kh, kw)`` for convs and ``(1, 1)`` for linear layers. ``weight_layout`` says how the
    weight is stored: ``"in_out"`` (MatMul ``x @ W``), ``"out_in"`` (Gemm transB=1, or a MatMul whose
    weight passes through a ``Transpose`` node, as in unoptimized dynamo exports) or ``"conv"``.
    ``stride`` is ``(sh, sw)``; ``padding`` is ONNX's ``pads`` order ``(top, left, bottom, right)``.
    """

    module: str
    kind: str
    node: str
    weight: str
    d_in: int
    d_out: int
    kernel: tuple[int, int] = (1, 1)
    weight_layout: str = "in_out"
    bias: str | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class AttentionBlock:
    """One attention module (``attn1`` self-attention or ``attn2`` cross-attention).

    ``module`` is its path (``...transformer_blocks.0.attn1``), ``heads`` the head count when the frontend
    could read it from the graph's reshapes (else None), and ``projections`` the attach-point module
    paths of its to_q/to_k/to_v/to_out.0 layers. ``nodes`` names the attention core between the
    projections (head reshapes/transposes, scaling, ``Q @ K^T``, Softmax, ``@ V``), in graph order.
    """

    module: str
    kind: str  # "self" or "cross"
    heads: int | None
    projections: tuple[str, ...]
    nodes: tuple[str, ...] = ()


@dataclass
class ModelInfo:
    """Frontend result for one ONNX U-Net: inputs, attach points, attention blocks, exporter flavour."""

    inputs: dict[str, tuple[str, tuple[int | str | None, ...]]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, tuple[int | str | None, ...]]] = field(default_factory=dict)
    points: dict[str, AttachPoint] = field(default_factory=dict)
    attention: list[AttentionBlock] = field(default_factory=list)
    exporter: str = "unknown"  # "torchscript", "dynamo" or "unknown"
    parameters: int = 0
    op_histogram: dict[str, int] = field(default_factory=dict)
    #: Graph input name for each role: ``sample``, ``timestep``, ``encoder_hidden_states``.
    roles: dict[str, str] = field(default_factory=dict)
    opset: int | None = None
    #: Attach points whose module path could not be recovered (keyed by node name instead).
    unnamed_points: int = 0

    def nearest_modules(self, module: str, n: int = 3) -> list[str]:
        """The ``n`` attach-point module paths most similar to ``module`` (for error messages)."""
        import difflib

        return difflib.get_close_matches(module, list(self.points), n=n, cutoff=0.0)
