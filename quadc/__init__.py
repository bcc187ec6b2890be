"""quadc: the QUAD compiler (one quantized SD1.5 U-Net graph, every LoRA a runtime input)."""

__version__ = "0.1.0"
