"""Table writers: exact Markdown / LaTeX / HTML text for a tiny DataFrame, CSV round trip."""

import math

import numpy as np
import pandas as pd
import pytest

from cm3dmm.tables import format_cell, latex_escape, markdown_to_html, to_html, to_latex, to_markdown, write_table


@pytest.fixture
def frame():
    return pd.DataFrame({
        "Method": ["cm3dmm", "pca_x"],
        "Dim": [128, 8],
        "CD (mm)": [0.30111, float("nan")],
        "F@1mm": [0.98765, 1.0],
    })


def test_markdown_exact(frame):
    assert to_markdown(frame, {"F@1mm": 2}) == (
        "| Method | Dim | CD (mm) | F@1mm |\n"
        "|:---|---:|---:|---:|\n"
        "| cm3dmm | 128 | 0.301 | 0.99 |\n"
        "| pca_x | 8 | n/a | 1.00 |\n"
    )


def test_latex_exact_booktabs_and_escaping(frame):
    assert to_latex(frame, 2) == (
        "\\begin{tabular}{lrrr}\n"
        "\\toprule\n"
        "Method & Dim & CD (mm) & F@1mm \\\\\n"
        "\\midrule\n"
        "cm3dmm & 128 & 0.30 & 0.99 \\\\\n"
        "pca\\_x & 8 & n/a & 1.00 \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
    )
    wrapped = to_latex(frame, 2, caption="Errors in % of 1 mm", label="tab:x")
    assert wrapped.startswith("\\begin{table}[t]\n\\centering\n\\caption{Errors in \\% of 1 mm}\n\\label{tab:x}\n"
                              "\\begin{tabular}{lrrr}\n")
    assert wrapped.endswith("\\end{tabular}\n\\end{table}\n")
    assert latex_escape("a_b & c%{d}~^\\") == "a\\_b \\& c\\%\\{d\\}\\textasciitilde{}\\textasciicircum{}\\textbackslash{}"


def test_cells():
    assert format_cell(1.23456, 3) == "1.235"
    assert format_cell(np.float32(2.0), 1) == "2.0"
    assert format_cell(np.int64(7)) == "7"
    assert format_cell(None) == format_cell(float("nan")) == format_cell(pd.NA) == "n/a"
    assert format_cell(True) == "yes"
    assert format_cell(math.inf) == "inf"
    assert format_cell(3.0, 0, integer=True) == "3"
    # nullable integers (a column with missing entries) stay integers
    df = pd.DataFrame({"Level": pd.array([None, 2], dtype="Int64"), "Name": ["a|b", "c"]})
    assert to_markdown(df) == "| Level | Name |\n|---:|:---|\n| n/a | a\\|b |\n| 2 | c |\n"


def test_html_escapes_and_aligns(frame):
    page = to_html(frame.assign(Method=["<b>", "x"]), 2, caption="cap & more")
    assert "<caption>cap &amp; more</caption>" in page
    assert "<td>&lt;b&gt;</td>" in page
    assert '<td style="text-align:right">128</td>' in page
    assert page.count("<tr>") == 3


def test_markdown_to_html():
    page = markdown_to_html("# Title\n\nSome **bold** `code`\ntext.\n\n- one\n- two\n## Sub\n")
    assert "<h1>Title</h1>" in page
    assert "<p>Some <strong>bold</strong> <code>code</code> text.</p>" in page
    assert "<ul>\n<li>one</li>\n<li>two</li>\n</ul>\n<h2>Sub</h2>" in page


def test_write_table_writes_all_formats(frame, tmp_path):
    out = write_table(frame, tmp_path / "t", "recon", {"F@1mm": 2}, caption="The caption.")
    assert set(out) == {"csv", "md", "tex", "html"}
    back = pd.read_csv(out["csv"])
    assert list(back.columns) == list(frame.columns)
    assert back["CD (mm)"][0] == 0.30111 and math.isnan(back["CD (mm)"][1])  # full precision
    md = out["md"].read_text()
    assert md.startswith("The caption.\n\n| Method |")
    assert "\\label{tab:recon}" in out["tex"].read_text()
    assert not list((tmp_path / "t").glob(".tmp-*"))
    with pytest.raises(ValueError):
        write_table(frame, tmp_path, "a/b")
