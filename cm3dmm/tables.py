"""Table writers: one pandas DataFrame -> CSV + Markdown + LaTeX (booktabs) + HTML, atomically.

    write_table(frame, directory, name, digits=3, caption="") -> {"csv", "md", "tex", "html": path}
    to_markdown(frame, digits=3) -> str
    to_latex(frame, digits=3, caption="", label="") -> str

Formatting (Markdown and LaTeX; the CSV keeps full precision):

* integers (and floats that are whole numbers in an integer column) print as integers;
* floats print with ``digits`` decimals (``digits`` is an int for every column or a mapping
  ``column -> int``; columns not in the mapping use 3);
* NaN / None print as ``n/a``; booleans as ``yes`` / ``no``;
* numeric columns are right-aligned, the others left-aligned;
* LaTeX escapes ``\\ & % $ # _ { } ~ ^`` in headers and cells; HTML escapes ``< > & "``.

The HTML page (table + caption) is what the Snakemake report shows.
"""

from __future__ import annotations

import html
import io
import math
import numbers
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from cm3dmm.io.atomic import atomic_write_text
from cm3dmm.paths import TABLE_FORMATS, table_file

#: decimals for float columns that are not given explicitly
DEFAULT_DIGITS = 3
MISSING = "n/a"

__all__ = ["write_table", "to_markdown", "to_latex", "to_html", "markdown_to_html", "format_cell", "DEFAULT_DIGITS", "MISSING"]


def _digits_for(digits: int | Mapping[str, int], column: str) -> int:
    if isinstance(digits, Mapping):
        return int(digits.get(column, DEFAULT_DIGITS))
    return int(digits)


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def format_cell(value, digits: int = DEFAULT_DIGITS, integer: bool = False) -> str:
    """One cell as text. ``integer``: the column holds whole numbers (print without decimals)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return MISSING
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if integer and x == round(x):
            return str(int(round(x)))
        return f"{x:.{digits}f}"
    return str(value)


def _cells(frame: pd.DataFrame, digits) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header texts, formatted rows and per-column right-alignment flags."""
    cols = [str(c) for c in frame.columns]
    numeric = [_is_numeric(frame[c]) for c in frame.columns]
    integer = []
    for c, num in zip(frame.columns, numeric):
        s = frame[c]
        if not num:
            integer.append(False)
        elif pd.api.types.is_integer_dtype(s):
            integer.append(True)
        else:
            vals = s.dropna().to_numpy(dtype=float)
            integer.append(bool(len(vals)) and bool(np.all(vals == np.round(vals))) and
                           bool(np.all(np.isfinite(vals))) and _digits_for(digits, str(c)) == 0)
    rows = []
    for rec in frame.itertuples(index=False, name=None):
        rows.append([format_cell(v, _digits_for(digits, col), it) for v, col, it in zip(rec, cols, integer)])
    return cols, rows, numeric


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(frame: pd.DataFrame, digits: int | Mapping[str, int] = DEFAULT_DIGITS) -> str:
    """A GitHub-flavoured pipe table (one line per row, trailing newline)."""
    cols, rows, numeric = _cells(frame, digits)
    lines = ["| " + " | ".join(_md_escape(c) for c in cols) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(frame: pd.DataFrame, digits: int | Mapping[str, int] = DEFAULT_DIGITS, caption: str = "",
             label: str = "") -> str:
    """A booktabs ``tabular`` (inside a ``table`` float with ``caption`` / ``label`` when given).

    Needs ``\\usepackage{booktabs}`` in the document.
    """
    cols, rows, numeric = _cells(frame, digits)
    body = [r"\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}", r"\toprule",
            " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    body += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in rows]
    body += [r"\bottomrule", r"\end{tabular}"]
    if not caption and not label:
        return "\n".join(body) + "\n"
    out = [r"\begin{table}[t]", r"\centering"]
    if caption:
        out.append(r"\caption{" + latex_escape(caption) + "}")
    if label:
        out.append(r"\label{" + label + "}")
    return "\n".join(out + body + [r"\end{table}"]) + "\n"


def to_html(frame: pd.DataFrame, digits: int | Mapping[str, int] = DEFAULT_DIGITS, caption: str = "",
            title: str = "") -> str:
    """A standalone HTML page with the table (same formatting as Markdown) and its caption."""
    cols, rows, numeric = _cells(frame, digits)

    def cell(tag: str, text: str, right: bool) -> str:
        style = ' style="text-align:right"' if right else ""
        return f"<{tag}{style}>{html.escape(text)}</{tag}>"

    head = "<tr>" + "".join(cell("th", c, n) for c, n in zip(cols, numeric)) + "</tr>"
    body = "\n".join("<tr>" + "".join(cell("td", v, n) for v, n in zip(row, numeric)) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            f"<style>{_CSS}</style></head><body>\n<table>{cap}\n<thead>{head}</thead>\n<tbody>\n{body}\n"
            "</tbody></table>\n</body></html>\n")


_CSS = ("body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse}"
        "caption{caption-side:top;text-align:left;padding:0 0 .6em 0;max-width:60em}"
        "th,td{padding:.25em .7em;border-bottom:1px solid #ddd}thead th{border-bottom:2px solid #444}"
        "tbody tr:last-child td{border-bottom:2px solid #444}")


def markdown_to_html(text: str, title: str = "") -> str:
    """A minimal Markdown subset (``#`` headings, ``-`` bullets, paragraphs, ``**bold**``, ```code```)
    as a standalone HTML page (for documents like ``protocol.md`` in the Snakemake report)."""
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out, in_list, para = [], False, []

    def flush():
        nonlocal para
        if para:
            out.append("<p>" + inline(" ".join(para)) + "</p>")
            para = []

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            flush()
            if in_list:
                out.append("</ul>")
                in_list = False
            level = min(len(stripped) - len(stripped.lstrip("#")), 6)
            out.append(f"<h{level}>{inline(stripped[level:].strip())}</h{level}>")
        elif stripped.startswith("- "):
            flush()
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append("<li>" + inline(stripped[2:]) + "</li>")
        elif not stripped:
            flush()
            if in_list:
                out.append("</ul>")
                in_list = False
        else:
            para.append(stripped)
    flush()
    if in_list:
        out.append("</ul>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def to_csv(frame: pd.DataFrame) -> str:
    """CSV text with full precision (``repr`` floats), no index."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def write_table(frame: pd.DataFrame, directory: str | os.PathLike, name: str,
                digits: int | Mapping[str, int] = DEFAULT_DIGITS, caption: str = "") -> dict[str, Path]:
    """Write ``{name}.csv``, ``.md``, ``.tex`` and ``.html`` into ``directory`` (atomically; the names:
    :func:`cm3dmm.paths.table_file`).

    The Markdown file starts with the caption (when given) as a paragraph.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    if not name or "/" in name:
        raise ValueError(f"invalid table name {name!r}")
    d = Path(directory)
    md = to_markdown(frame, digits)
    if caption:
        md = caption.strip() + "\n\n" + md
    out = {fmt: table_file(d, name, fmt) for fmt in TABLE_FORMATS}
    atomic_write_text(out["csv"], to_csv(frame))
    atomic_write_text(out["md"], md)
    atomic_write_text(out["tex"], to_latex(frame, digits, caption, f"tab:{name}"))
    atomic_write_text(out["html"], to_html(frame, digits, caption, name))
    return out
