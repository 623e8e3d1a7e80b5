"""Entry point: `python -m pipeline.predict` (see `pipeline.lib.inference.predict`)."""

from pipeline.lib.inference.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
