"""Report pictures: every figure renders from real PruneReports, the HTML holds the tables and figures a run's
report must have, nothing is overwritten."""

from __future__ import annotations

import base64
import html
import re

import pytest
from tinymodels import calib_batches, make_tiny

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.report.html import ReportDetails, render_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _report(model: str = "llama", **kwargs):
    pruner = D2Pruner(D2PruneConfig(**kwargs))
    pruner.prune(make_tiny(model), calib_batches(num=1))
    return pruner.report


@pytest.fixture(scope="module")
def reports():
    return {method: _report(method=method, sparsity=0.5, method_options={"refit_steps": 0} if method == "d2prune"
                            else None) for method in ("d2prune", "wanda")}


def _figures(page: str) -> list[str]:
    """The embedded figures of a report page, in order; each must be a PNG."""
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    for name, data in found:
        assert base64.b64decode(data).startswith(PNG), name
    return [name for name, _ in found]


CURVES = [  # perplexities drawn or not: a figure only where there is a curve (three points or more)
    ({"d2prune": {0.0: 30.0, 0.5: 55.0, 0.7: 140.0}, "wanda": {0.0: 30.0, 0.5: 64.0, 0.7: 300.0}}, True),
    ({"d2prune": {0.0: 30.0, 0.5: 55.0}, "wanda": {0.0: 30.0, 0.5: 64.0}}, False),
]


@pytest.mark.parametrize("ppl,curve", CURVES)
def test_markdown_report_has_every_figure(reports, tmp_path, ppl, curve):
    written = write_report(tmp_path, reports, ReportDetails(perplexities=ppl), format="markdown")
    names = {p.name for p in written}
    expected = {"report.md", "layer_errors.png", "attention_choices.png", "module_sparsity.png"}
    assert names == expected | ({"perplexity.png"} if curve else set())
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes().startswith(PNG) and p.stat().st_size > 5000
    text = (tmp_path / "report.md").read_text()
    assert "![" in text and "| block | layer |" in text
    with pytest.raises(FileExistsError, match="overwrite"):
        write_report(tmp_path, reports, format="markdown")


def test_html_report_embeds_pngs(reports):
    files = render_report(reports["wanda"])  # no attention records: that figure is skipped
    assert list(files) == ["report.html"]
    page = files["report.html"]
    assert _figures(page) == ["layer_errors.png", "module_sparsity.png"] and "wanda" in page
    with pytest.raises(ValueError, match="format"):
        render_report(reports, format="pdf")
    with pytest.raises(ValueError, match="PruneReport"):
        render_report({"x": 1})


def _layer_rows(page: str) -> list[list[str]]:
    """The rows of the per-layer table of a page (cells stripped)."""
    table = page.split("<summary>Per-layer table")[1].split("</pre>")[0].split("\n\n")[0]  # the attention table next
    return [[c.strip() for c in line.strip("|").split("|")] for line in html.unescape(table).splitlines()
            if line.startswith("| ") and not line.startswith("| block")]


def test_report_of_a_data_free_method_has_its_tables_and_figures():
    """Magnitude pruning measures no reconstruction error and makes no attention choice: the page still holds the
    summary, the error and sparsity figures (no attention figure), and one table row per pruned matrix with its
    solver, sparsity and "n/a" for the error."""
    report = _report(method="magnitude")
    page = render_report({"magnitude": report})["report.html"]
    assert "<h2>magnitude</h2>" in page and "method=magnitude pattern=50% layers=14 sparsity=50.00%" in page
    assert _figures(page) == ["layer_errors.png", "module_sparsity.png"]
    rows = _layer_rows(page)
    assert [row[1] for row in rows] == [r.name for r in report.layers] and len(rows) == 14
    assert {(row[2], row[3], row[4], row[5]) for row in rows} == {("magnitude", "no", "50.00%", "n/a")}
    assert "left un-updated" not in page  # no attention table


def test_report_of_a_high_sparsity_run_has_budgets_refits_and_choices():
    """OWL budgets, block reconstruction and the q/k/v choice each add what the page must show: the per-block
    table (budget, achieved sparsity, refit errors), the attention figure and table."""
    report = _report("llama4", sparsity=0.8, preset="max_quality")
    page = render_report({"max_quality": report})["report.html"]
    assert _figures(page) == ["layer_errors.png", "attention_choices.png", "module_sparsity.png"]
    block_table = html.unescape(page.split("<pre>| block | budget |")[1].split("</pre>")[0])
    rows = [line.strip("|").split("|") for line in block_table.splitlines() if line.startswith("| ")]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert [r[1].strip() for r in rows] == [f"{b:.2%}" for b in report.block_sparsity]
    assert all("o_proj" in r[3] and "down_proj" in r[3] for r in rows)
    assert f"non-uniform budgets: block sparsity {min(report.block_sparsity):.2%}" in page
    attention = html.unescape(page.split("| block | left un-updated |")[1].split("</pre>")[0])
    chosen = [line.strip("|").split("|")[1].strip() for line in attention.splitlines()[2:] if line.startswith("| ")]
    assert chosen == [a.chosen for a in report.attention] and len(chosen) == 4
    assert [row[1] for row in _layer_rows(page)] == [r.name for r in report.layers]
