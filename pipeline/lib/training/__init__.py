"""Two-phase fit, its callbacks and batches."""
