"""Write `.dvc/plots/offline.html`: DVC's plots page with Vega inlined, so plots draw offline.

DVC's default page for `dvc plots show` / `dvc plots diff` loads Vega, Vega-Lite and
Vega-Embed from a CDN, so on a machine without internet it stays blank. This page holds the
same libraries inline, bundled by the pinned `vl-convert-python` package (no network), and
`.dvc/config` points DVC at it (`plots.html_template`). `make setup` writes it; the commands
users type stay `dvc plots show` and `dvc plots diff`.

    python -m commands.offline_plots
"""

from __future__ import annotations

from pathlib import Path

import vl_convert

from pipeline import atomic, runner

OUT = Path(".dvc/plots/offline.html")
VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite 5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {embed}: inlined by vl-convert-python {vlc}, no CDN -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main() -> None:
    page = PAGE.format(
        vega=vl_convert.get_vega_version(),
        vega_lite=VEGA_LITE,
        embed=vl_convert.get_vega_embed_version(),
        vlc=vl_convert.__version__,
        bundle=vl_convert.javascript_bundle(vl_version=VEGA_LITE),
    )
    atomic.write_text(OUT, page)
    print(f"{OUT}: DVC's plots page with Vega inlined ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
