"""An offline page for `dvc plots show`: a DVC HTML template with Vega bundled inline (DVC's own
page loads Vega from a CDN, blank without internet). `vl-convert-python` ships Vega, Vega-Lite
and Vega-Embed as one script defining the global `vegaEmbed` that DVC's plot snippets call; the
template has DVC's `{plot_divs}` placeholder and no `{scripts}` one (no CDN tags)."""

from __future__ import annotations

import os
from pathlib import Path

#: Vega-Lite major.minor the bundle is made for: DVC's templates declare Vega-Lite v5 specs.
VEGA_LITE_VERSION = "5.21"

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
<script>{bundle}</script>
<style>
  body {{ font-family: sans-serif; margin: 16px; }}
  img {{ max-width: 100%; height: auto; }}
  table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def write_template(path: str | os.PathLike[str]) -> Path:
    """Write the template (about 0.9 MB) to `path` (its folder created); return the path."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.format(bundle=bundle.replace("</script", "<\\/script")), encoding="utf-8")
    return path
