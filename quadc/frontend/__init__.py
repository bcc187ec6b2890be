"""quadc.frontend: load a U-Net ONNX graph and recognize its LoRA attachment points and attention blocks.

Example::

    graph, info = load("unet.onnx")
    info.points["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]  # AttachPoint
    print(format_inspect(info))
"""

from quadc.frontend.load import format_inspect, load
from quadc.frontend.model_info import AttachPoint, AttentionBlock, ModelInfo
from quadc.frontend.recognize import recognize_unet

__all__ = ["AttachPoint", "AttentionBlock", "ModelInfo", "format_inspect", "load", "recognize_unet"]
