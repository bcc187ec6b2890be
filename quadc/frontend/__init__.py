"""quadc.frontend."""
