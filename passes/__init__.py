"""Graph passes: one module per pass, registered by kebab-case name.

Importing this package registers the built-in passes. Use :func:`registered_passes` to list them,
:class:`PassPipeline` (or :func:`parse_pipeline`) to build a pipeline from ``"a,b,preset"`` and :func:`run_pipeline` to run it.
"""

from quadc.passes import (  # noqa: F401  (registration)
    const_fold,
    conv_act_fusion,
    dce,
    linear_to_conv,
    lora_inputs,
    mha_split,
    qdq_insert,
    qnn_const_first,
    qnn_div_const,
    qnn_gelu,
    qnn_groupnorm,
    quant_plan,
    scale_fold,
    transpose_cancel,
)
from quadc.passes.base import (
    GraphPass,
    PassOption,
    PassResult,
    get_pass,
    op_count,
    register_pass,
    registered_passes,
)
from quadc.passes.pipeline import PassPipeline, PassRecord, PassStep, parse_pipeline, run_pipeline
from quadc.passes.presets import PRESETS

__all__ = [
    "PRESETS",
    "GraphPass",
    "PassOption",
    "PassPipeline",
    "PassRecord",
    "PassStep",
    "PassResult",
    "get_pass",
    "op_count",
    "parse_pipeline",
    "register_pass",
    "registered_passes",
    "run_pipeline",
]
