"""Write the offline `dvc plots show` template (Vega bundled inline) and point DVC at it.

python -m pipeline.plots_template            # .venv/dvc_plots_template.html, .dvc/config.local
python -m pipeline.plots_template PATH --no-config

DVC's own page loads Vega from a CDN (blank without internet); here `vl-convert-python` ships
Vega, Vega-Lite and Vega-Embed as one script defining the `vegaEmbed` that DVC's plot snippets
call, and the template has DVC's `{plot_divs}` placeholder but no `{scripts}` one (no CDN tags).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT = Path(".venv") / "dvc_plots_template.html"
#: Vega-Lite major.minor the bundle is made for: DVC's templates declare Vega-Lite v5 specs.
VEGA_LITE_VERSION = "5.21"

#: DVC pastes its plot snippets, data and revision names unescaped, over `{plot_divs}`: here that
#: is inside `<plaintext>`, which nothing in them can end, so the browser reads them as text. The
#: script then draws each Vega spec (`var spec = <one line of JSON>;`) with `JSON.parse`, and
#: each image with its heading as text; no name in the data can run script or break the page.
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
<script>BUNDLE</script>
<script>
addEventListener("DOMContentLoaded", () => {
  const source = document.getElementById("dvc-plots");
  const add = (tag) => document.body.insertBefore(document.createElement(tag), source);
  const snippet = /^\\s*(?:var spec = (.*);|<p>(.*)<\\/p>|<img src="([^"]*)">)$/gm;
  for (const [, spec, text, src] of source.textContent.matchAll(snippet)) {
    if (spec) vegaEmbed(add("div"), JSON.parse(spec));
    else if (src) add("img").src = src;
    else add("p").textContent = text;
  }
  source.remove();
});
</script>
<style>
  body { font-family: sans-serif; margin: 16px; }
  img { max-width: 100%; height: auto; }
</style>
</head>
<body>
<plaintext id="dvc-plots" hidden>{plot_divs}"""


def write_template(path: str | os.PathLike[str]) -> Path:
    """Write the template (about 0.9 MB) to `path` (its folder created); return the path."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.replace("BUNDLE", bundle.replace("</script", "<\\/script"), 1), "utf-8")
    return path


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
