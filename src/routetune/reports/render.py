"""What the run report and the study report share: matplotlib set up for files, saving a figure,
formatting a table cell, and the Markdown and HTML pages built from (heading, header, rows, images)
sections."""

from __future__ import annotations

import html
from pathlib import Path

from routetune.training.events import COUNTS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def finish(fig, ax, drawn: bool, path: Path, **labels) -> str | None:
    """Label, legend and save a line plot; None (and no file) when nothing was drawn."""
    if not drawn:
        pyplot().close(fig)
        return None
    ax.set(**labels)
    ax.legend(fontsize=8)
    return save(fig, path)


def fmt(v, key: str | None = None, spec: str = ".4f") -> str:
    """A table cell: `-` for nothing, a count with thousands separators, a float by `spec`."""
    if v is None:
        return "-"
    if key in COUNTS and isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
        return f"{int(v):,}"  # a count, not a measurement
    if isinstance(v, float):
        return format(v, spec)
    return str(v)



def markdown(title: str, parts) -> str:
    lines = [f"# {title}", ""]
    for heading, header, rows, imgs in parts:
        lines += [f"## {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r + [""] * (len(header) - len(r))) + " |" for r in rows]
        lines.append("")
        lines += [f"![{img}]({img})" for img in imgs]
        lines.append("")
    return "\n".join(lines)


def html_page(title: str, parts) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for heading, header, rows, imgs in parts:
        body.append(f"<h2>{e(heading)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        body.append("</table>")
        body += [f'<p><img src="{e(img)}" alt="{e(img)}"></p>' for img in imgs]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
