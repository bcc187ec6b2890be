"""quadc.lora."""
