"""quadc.targets."""
