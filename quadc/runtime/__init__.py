"""Runtime: one loaded graph, a LoRA store with caching and preloading, task switching."""
