"""Entry point: `python -m pipeline.compare` (see `pipeline.lib.tracking.compare`)."""

from pipeline.lib.tracking.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
