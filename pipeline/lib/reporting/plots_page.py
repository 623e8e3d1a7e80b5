"""An offline page for `dvc plots show`: a DVC HTML template with Vega bundled inline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without internet its
interactive plots are blank. `vl-convert-python` (the Vega project's converter) ships those
libraries; `javascript_bundle` returns them as one script that defines `vegaEmbed` globally,
which is what the plot snippets DVC writes call. The template has DVC's `{plot_divs}` placeholder
and no `{scripts}` one, so DVC's CDN tags are left out.
"""

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


def template_html() -> str:
    """The template's text (about 0.9 MB: Vega, Vega-Lite and Vega-Embed inline)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    return PAGE.format(bundle=bundle.replace("</script", "<\\/script"))


def write_template(path: str | os.PathLike[str]) -> Path:
    """Write the template to `path` (its folder created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_html(), encoding="utf-8")
    return path
