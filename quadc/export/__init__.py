"""quadc.export."""
