"""Data sources for the prepare stage: `synthetic` (generated toy trucks) and `folder` (your photos)."""
