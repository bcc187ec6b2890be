"""Target ``neuropilot``: fully integer 16x8 TFLite for MediaTek NeuroPilot, run here in LiteRT.

Quantized TFLite is the documented input of MediaTek's compiler (and of LiteRT's MediaTek compiler
plugin); 16-bit symmetric activations with 8-bit weights are supported. The graph uses only the ops
the plugin lists (:data:`NEUROPILOT_OPS`, from LiteRT's ``litert/vendors/mediatek/compiler`` supported-op
table): NHWC layout, fused activations where TFLite has them, LoRA factors as int8 subgraph inputs with
one shared encoding per slot. The plugin lists no EXP/COS/SIN, so the sinusoidal timestep embedding is
computed on the host in numpy (``host.onnx``, see :mod:`quadc.targets.tflite.host`). See
:mod:`quadc.targets.tflite.target` for the artifact.
"""

from __future__ import annotations

from quadc.targets.tflite.target import TfliteTarget

#: TFLite builtins LiteRT's MediaTek NeuroPilot compiler plugin lists as supported.
NEUROPILOT_OPS: tuple[str, ...] = (
    "ADD", "MUL", "BATCH_MATMUL", "FULLY_CONNECTED", "RESHAPE", "TRANSPOSE", "RSQRT", "CONCATENATION",
    "QUANTIZE", "SLICE", "STRIDED_SLICE", "SPLIT", "SUB", "TANH", "SOFTMAX", "MEAN", "GELU", "PAD", "LOGISTIC",
    "SUM", "CONV_2D", "DEPTHWISE_CONV_2D", "SQUARED_DIFFERENCE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR",
    "TRANSPOSE_CONV", "MAX_POOL_2D", "DEQUANTIZE", "PADV2", "HARD_SWISH", "AVERAGE_POOL_2D", "REDUCE_MAX",
    "SQRT", "DIV", "CAST", "PRELU", "LEAKY_RELU", "MAXIMUM", "RELU", "ABS", "GREATER", "MINIMUM",
)


class NeuropilotTarget(TfliteTarget):
    """16x8 TFLite limited to MediaTek NeuroPilot's plugin ops; timestep embedding on the host."""

    name = "neuropilot"
    description = "fully integer 16x8 TFLite (int8 LoRA inputs, shared encodings) for MediaTek NeuroPilot; runs in LiteRT"
    supported_ops = NEUROPILOT_OPS
