"""quadc.quant."""
