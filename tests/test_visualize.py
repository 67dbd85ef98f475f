"""Report pictures: every figure renders from real PruneReports, HTML embeds them, nothing is overwritten."""

from __future__ import annotations

import pytest

from conftest import calib_batches, make_tiny
from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.visualize import render_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports():
    out = {}
    for method in ("d2prune", "wanda"):
        pruner = D2Pruner(D2PruneConfig(method=method, sparsity=0.5, refine_steps=0))
        pruner.prune(make_tiny("llama"), calib_batches(num=1))
        out[method] = pruner.report
    return out


def test_markdown_report_has_every_figure(reports, tmp_path):
    ppl = {"d2prune": {0.0: 30.0, 0.5: 55.0}, "wanda": {0.0: 30.0, 0.5: 64.0}}
    written = write_report(tmp_path, reports, perplexities=ppl, format="markdown")
    names = {p.name for p in written}
    assert names == {"report.md", "layer_errors.png", "attention_choices.png", "module_sparsity.png", "perplexity.png"}
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
    assert page.count("data:image/png;base64,") == 2 and "wanda" in page
    with pytest.raises(ValueError, match="format"):
        render_report(reports, format="pdf")
    with pytest.raises(ValueError, match="PruneReport"):
        render_report({"x": 1})


def test_report_of_a_data_free_method_renders():
    """Magnitude pruning measures no reconstruction error: the figures must still render (no legend to draw)."""
    from conftest import calib_batches, make_tiny

    from optimum_d2prune import D2PruneConfig, D2Pruner
    from optimum_d2prune.visualize import render_report

    pruner = D2Pruner(D2PruneConfig(method="magnitude"))
    pruner.prune(make_tiny("llama"), calib_batches(num=1))
    assert "report.html" in render_report({"magnitude": pruner.report})
