"""Graph passes: one module per pass, registered by kebab-case name.

Importing this package registers the built-in passes. Use :func:`registered_passes` to list them,
:func:`parse_pipeline` to build a pipeline from ``"a,b,c"`` and :func:`run_pipeline` to run it.
"""

from quadc.passes import const_fold, dce, lora_inputs, qdq_insert  # noqa: F401  (registration side effects)
from quadc.passes.base import GraphPass, PassResult, get_pass, register_pass, registered_passes
from quadc.passes.pipeline import PassRecord, parse_pipeline, run_pipeline

__all__ = [
    "GraphPass",
    "PassRecord",
    "PassResult",
    "get_pass",
    "parse_pipeline",
    "register_pass",
    "registered_passes",
    "run_pipeline",
]
