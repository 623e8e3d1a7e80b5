"""MLflow: store, runs, lineage, sweeps, registry, the served pyfunc model."""
