"""Configuration: the typed schema, params.yaml composition, the Hydra step runner."""
