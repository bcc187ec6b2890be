"""quadc.eval."""
