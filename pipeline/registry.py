"""Entry point: `python -m pipeline.registry` (see `pipeline.lib.tracking.registry`)."""

from pipeline.lib.tracking.registry import main

if __name__ == "__main__":
    raise SystemExit(main())
