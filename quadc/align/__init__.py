"""quadc.align."""
