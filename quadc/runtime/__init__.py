"""quadc.runtime."""
