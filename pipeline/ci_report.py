"""Entry point: `python -m pipeline.ci_report` (see `pipeline.lib.reporting.ci_report`)."""

from pipeline.lib.reporting.ci_report import main

if __name__ == "__main__":
    raise SystemExit(main())
