"""HTML rendering for the run report: escaping, numbers, tables, images as data: URIs, cards, line charts.

Pure: values in, HTML strings (or PNG bytes for charts) out; nothing is fetched by the page.
"""

from __future__ import annotations

import base64
import html
import io

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:24px}
header p{margin:0;color:#c9d1e0}nav{margin-top:10px}nav a{color:#9fc3ff;margin-right:14px;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:8px 32px 40px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:4px 22px 18px;margin:18px 0}
h2{font-size:19px;border-bottom:1px solid #e1e4ea;padding-bottom:6px}h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}th,td{border:1px solid #e1e4ea;padding:4px 10px;
text-align:left}th{background:#f0f2f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{flex:1 1 170px;border:1px solid #e1e4ea;border-radius:8px;
padding:10px 14px}.card b{display:block;font-size:22px}.card span{color:#5a6478;font-size:13px}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}figure img{max-width:100%;
border:1px solid #e1e4ea}figcaption{font-size:13px;color:#5a6478}.note{color:#5a6478}
code{background:#f0f2f6;padding:1px 4px;border-radius:3px;font-size:13px}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.5g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return esc(value)


def table(headers: list[str], rows: list[list]) -> str:
    """An HTML table; numbers right-aligned and formatted, everything else escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{number(cell)}</td>' if isinstance(cell, int | float) and not isinstance(cell, bool)
        else f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(png: bytes, alt: str, caption: str | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{text}</figure>'


def cards(items: list[tuple[str, object]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{number(value)}</b><span>{esc(label)}</span></div>' for label, value in items) + "</div>"


def section(key: str, heading: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(heading)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: dict[str, str], headings: dict[str, str]) -> str:
    """The whole page: a header with a link per section, then the sections (``headings`` names each)."""
    nav = "".join(f'<a href="#{key}">{esc(headings[key])}</a>' for key in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p><nav>{nav}</nav></header><main>"
            + "".join(section(key, headings[key], body) for key, body in sections.items()) + "</main></body></html>\n")


def line_chart(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.6, 3.4), dpi=100)
    for label, (xs, ys) in series.items():
        axis.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=4, label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=11)
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
