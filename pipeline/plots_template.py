"""Write the offline `dvc plots show` template (Vega bundled inline) and point DVC at it.

python -m pipeline.plots_template            # .venv/dvc_plots_template.html, .dvc/config.local
python -m pipeline.plots_template PATH --no-config
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline.lib.reporting.plots_page import write_template

DEFAULT = Path(".venv") / "dvc_plots_template.html"


def main(argv: list[str] | None = None) -> int:
    """Write the template; unless --no-config, set `plots.html_template` in .dvc/config.local."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=str(DEFAULT), help=f"default: {DEFAULT}")
    parser.add_argument("--no-config", action="store_true", help="leave .dvc/config.local alone")
    args = parser.parse_args(argv)
    path = write_template(args.path).resolve()
    print(f"wrote {path}")
    if not args.no_config:
        cmd = [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", str(path)]
        subprocess.run(cmd, check=True)
        print("dvc plots show now uses it (.dvc/config.local: plots.html_template)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
