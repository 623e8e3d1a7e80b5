"""Data audits on the cached features: label issues, near-duplicates, data sufficiency."""
