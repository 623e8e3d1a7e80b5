"""Data sources of the prepare stage: `synthetic` (toy trucks) and `folder` (your photos)."""
