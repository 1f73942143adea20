"""HTML building blocks shared by the run report and the comparison page.

One self-contained file: CSS inline, images as base64 `data:` URIs, no script, no external
fetch, so the page opens the same from a laptop, an S3 download or a CI artifact. Every string
from a run (names, config values, alarm text) goes through `esc`.
"""

from __future__ import annotations

import base64
import html
import math

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.alarms { background: #fff1f0; border: 2px solid #cf1322; padding: 8px 16px; margin: 12px 0; }
.alarms h2 { color: #cf1322; border: none; margin-top: 8px; }
.ok { background: #f6ffed; border: 2px solid #52c41a; padding: 8px 16px; margin: 12px 0; }
.note { color: #8c6d1f; background: #fffbe6; padding: 6px 12px; font-size: 13px; }
img { max-width: 100%; display: block; margin: 8px 0; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


class Raw(str):
    """HTML that a table cell takes as is (built here, never from run data)."""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def img(png: bytes | None, alt: str, missing: list[str] | None = None) -> str:
    """An inline PNG, or a note saying what could not be drawn (and why, via `missing`)."""
    if png is None:
        if missing is not None:
            missing.append(alt)
        return f'<p class="note">No data for: {esc(alt)}.</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return esc(value)
        return f"{value:.{digits}g}"
    return esc(value)


def table(header: list[str] | None, rows: list[list], left_cols: int = 1) -> str:
    """A table; `header` None for a key/value table that has no column names (an empty header
    row would show as a blank grey bar)."""
    def cell(tag, i, v):
        cls = ' class="l"' if i < left_cols else ""
        return f"<{tag}{cls}>{v}</{tag}>"
    head = "" if header is None else \
        "<tr>" + "".join(cell("th", i, esc(h)) for i, h in enumerate(header)) + "</tr>"
    body = "".join("<tr>" + "".join(cell("td", i, v if isinstance(v, Raw) else fmt(v))
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"
