"""Pictures of pruning runs: per-layer error, attention choices, per-module sparsity, perplexity vs sparsity.

`render_report` returns the files (a self-contained `report.html` with embedded PNGs, or PNGs + `report.md`);
`write_report` writes them into a folder. Figures are standalone Agg figures (no display, no pyplot state).
Without matplotlib (`pip install "optimum-d2prune[report]"`) the report holds its tables and no figure.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..extras import is_available, require
from .records import PruneReport

logger = logging.getLogger(__name__)

PROJECTION_COLORS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c"}
Reports = Union[PruneReport, Mapping[str, PruneReport], list]


@dataclass
class ReportDetails:
    """What a report says besides the runs: how they were made and what was measured.

    `perplexities` (method -> {sparsity: perplexity}, 0.0 = dense) is drawn only where it is a curve (three
    points or more); `evaluation` (metric -> {"dense": x, "pruned": y} or a value) and `sizes` (metric -> how much
    data it rests on: windows, tokens, examples) make the evaluation table; `calibration` is the record of what the
    model was calibrated on; `command` the command line."""

    perplexities: Optional[Mapping[str, Mapping[float, float]]] = None
    zero_shot: Optional[Any] = None
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    sizes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    command: Optional[str] = None

    def curves(self) -> Optional[dict[str, Mapping[float, float]]]:
        curves = {m: p for m, p in (self.perplexities or {}).items() if len(p) >= 3}
        return curves or None

    def evaluation_rows(self) -> list[tuple[str, str, str, str]]:
        """(metric, dense, pruned, measured on) rows."""
        rows = []
        for name, value in self.evaluation.items():
            dense, pruned = (value.get("dense"), value.get("pruned")) if isinstance(value, Mapping) else (None, value)
            size = ", ".join(f"{n} {k}" for k, n in (self.sizes.get(name) or {}).items())
            rows.append((name, _number(dense), _number(pruned), size))
        return rows

    def calibration_text(self) -> str:
        c = self.calibration
        if not c:
            return ""
        what = c.get("path") or c.get("name") or c.get("source") or c.get("kind", "")
        size = f"{c['num_samples']} x {c['seq_len']} tokens" if "num_samples" in c and "seq_len" in c else ""
        digest = f", SHA-256 {c['sha256'][:16]}…" if c.get("sha256") else ""
        return f"{size} of {what} (seed {c.get('seed', 0)}{digest})".strip()


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _as_mapping(reports: Reports) -> dict[str, PruneReport]:
    if isinstance(reports, PruneReport):
        return {f"{reports.method} {reports.pattern}": reports}
    if isinstance(reports, Mapping):
        out = dict(reports)
    else:
        out = {}
        for r in reports:
            label = f"{r.method} {r.pattern}"
            out[label if label not in out else f"{label} #{len(out)}"] = r
    if not out or not all(isinstance(r, PruneReport) for r in out.values()):
        raise ValueError("`reports` must be a PruneReport, a list of them, or a mapping label -> PruneReport.")
    return out


def _subplots(rows: int = 1, cols: int = 1, figsize=(6, 4), layout: Optional[str] = None, **kwargs):
    """A standalone Agg figure (no pyplot: no global figure registry, no backend switch) and its axes grid."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg").FigureCanvasAgg
    Figure = require("matplotlib.figure").Figure
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def _short(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`; keeps a `[q]` row-block suffix."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return name


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------- figures
def plot_layer_errors(reports: Reports):
    """One panel per layer kind (q/k/v/o/gate/up/down...): relative reconstruction error per block, one line per
    run, log scale; hollow markers on layers pruned without weight update."""
    reports = _as_mapping(reports)
    kinds: list[str] = []
    for r in reports.values():
        for rec in r.layers:
            if _short(rec.name) not in kinds:
                kinds.append(_short(rec.name))
    cols = min(4, max(1, len(kinds)))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = _subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharex=True)
    for ax, kind in zip(axes.flat, kinds):
        for i, (label, r) in enumerate(reports.items()):
            recs = [rec for rec in r.layers if _short(rec.name) == kind and rec.error == rec.error]
            if not recs:
                continue
            color = f"C{i}"
            ax.plot([rec.block for rec in recs], [max(rec.error, 1e-12) for rec in recs], "-", color=color,
                    label=label, lw=1.3)
            upd = [rec for rec in recs if rec.updated]
            non = [rec for rec in recs if not rec.updated]
            ax.plot([x.block for x in upd], [max(x.error, 1e-12) for x in upd], "o", color=color, ms=3)
            ax.plot([x.block for x in non], [max(x.error, 1e-12) for x in non], "o", mfc="white", color=color, ms=5)
        ax.set_title(kind, fontsize=10)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("block")
    for ax in axes[:, 0]:
        ax.set_ylabel("relative error")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if labels:  # data-free methods (magnitude) measure no error: nothing to label
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, 1.0),
                   frameon=False)
    fig.suptitle("Per-layer reconstruction error (hollow: pruned without weight update)", y=1.04)
    fig.tight_layout()
    return fig


def plot_attention_choices(reports: Reports):
    """Top: the projection left un-updated in each block, one row per run. Bottom (first run with choices): each
    candidate's objective (error + rho * KL) per block."""
    reports = {k: r for k, r in _as_mapping(reports).items() if r.attention}
    if not reports:
        return None
    blocks = max(a.block for r in reports.values() for a in r.attention) + 1
    first = next(iter(reports.values()))
    has_objectives = any(a.objectives for a in first.attention)
    fig, axes = _subplots(2 if has_objectives else 1, 1,
                          figsize=(max(6.0, 0.28 * blocks + 2), 1.0 + 0.45 * len(reports) + (3.0 if has_objectives else 0)),
                          gridspec_kw={"height_ratios": [0.45 * len(reports) + 0.4] + ([3.0] if has_objectives else [])})
    from matplotlib.patches import Rectangle

    ax = axes[0, 0]
    for row, (label, r) in enumerate(reports.items()):
        for a in r.attention:
            color = PROJECTION_COLORS.get(a.chosen, "#999999")
            ax.add_patch(Rectangle((a.block - 0.5, row - 0.4), 1, 0.8, color=color, alpha=0.85))
            ax.text(a.block, row, a.chosen, ha="center", va="center", fontsize=8, color="white", weight="bold")
    ax.set_xlim(-0.5, blocks - 0.5)
    ax.set_ylim(len(reports) - 0.5, -0.5)
    ax.set_yticks(range(len(reports)))
    ax.set_yticklabels(list(reports))
    ax.set_xticks(range(0, blocks, max(1, blocks // 15)))
    ax.set_xlabel("block")
    ax.set_title("Projection pruned without weight update, per block")
    if has_objectives:
        ax2 = axes[1, 0]
        for p, color in PROJECTION_COLORS.items():
            pts = [(a.block, a.objectives[p]) for a in first.attention if p in a.objectives]
            if pts:
                ax2.plot([b for b, _ in pts], [v for _, v in pts], "-o", color=color, ms=3, label=f"{p} un-updated")
        chosen = [(a.block, a.objectives[a.chosen]) for a in first.attention if a.chosen in a.objectives]
        ax2.plot([b for b, _ in chosen], [v for _, v in chosen], "k*", ms=8, label="chosen")
        ax2.set_xlim(-0.5, blocks - 0.5)
        ax2.set_xticks(range(0, blocks, max(1, blocks // 15)))  # same ticks as the strip above
        ax2.set_xlabel("block")
        ax2.set_ylabel("objective (error + ρ·KL)")
        ax2.set_title(f"Candidates' objective ({next(iter(reports))})")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    return fig


def plot_module_sparsity(reports: Reports):
    """Heatmap per run: achieved sparsity of every pruned matrix, layer kind x block."""
    reports = _as_mapping(reports)
    fig, axes = _subplots(len(reports), 1, figsize=(10, 2.9 * len(reports) + 0.4), layout="constrained")
    image = None
    for i, (ax, (label, r)) in enumerate(zip(axes[:, 0], reports.items())):
        kinds: list[str] = []
        for rec in r.layers:
            if _short(rec.name) not in kinds:
                kinds.append(_short(rec.name))
        blocks = max((rec.block for rec in r.layers), default=0) + 1
        grid = [[math.nan] * blocks for _ in kinds]
        for rec in r.layers:
            grid[kinds.index(_short(rec.name))][rec.block] = rec.sparsity
        image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(kinds)))
        ax.set_yticklabels(kinds, fontsize=8)
        ax.set_xticks(range(0, blocks, max(1, blocks // 15)))
        if i == len(reports) - 1:
            ax.set_xlabel("block")
        if blocks * len(kinds) <= 400:  # small enough to print every value in its cell
            for y, row in enumerate(grid):
                for x, value in enumerate(row):
                    if value == value:
                        ax.text(x, y, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if value < 0.6 else "black")
        values = [rec.sparsity for rec in r.layers]
        ax.set_title(f"{label}: sparsity per matrix (min {min(values):.2%}, max {max(values):.2%}, "
                     f"overall {r.total_sparsity:.2%})", fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="fraction of zeros (cells: %)", fraction=0.03)
    return fig


def plot_perplexity(perplexities: Mapping[str, Mapping[float, float]]):
    """Perplexity vs sparsity, one line per method (log scale). `perplexities`: method -> {sparsity: ppl};
    sparsity 0 is the dense model."""
    fig, axes = _subplots(figsize=(6, 4))
    ax = axes[0, 0]
    values = []
    for i, (method, points) in enumerate(perplexities.items()):
        xs = sorted(points)
        ax.plot([100 * x for x in xs], [points[x] for x in xs], "-o", color=f"C{i}", label=method)
        if len(perplexities) == 1:  # with several curves the labels would collide; the tables have them
            for x in xs:
                v = points[x]
                ax.annotate(f"{v:.1f}" if v < 1e5 else f"{v:.3g}", (100 * x, v), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=f"C{i}")
        values += [points[x] for x in xs]
    ax.margins(x=0.1)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("perplexity")
    if values and min(values) > 0 and max(values) / min(values) > 10:  # log only when it spans a decade
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Perplexity vs sparsity")
    fig.tight_layout()
    return fig


def plot_zero_shot(results: Mapping[str, Any]):
    """Grouped bars: zero-shot score per task (and the mean) for each run. `results`: label -> ZeroShotResults."""
    labels = list(results)
    tasks = list(next(iter(results.values())).scores()) + ["mean"]
    fig, axes = _subplots(figsize=(max(6, 1.1 * len(tasks)), 3.8))
    ax = axes[0, 0]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        scores = results[label].scores()
        values = [scores.get(t, math.nan) for t in tasks[:-1]] + [results[label].mean]
        ax.bar([j + (i - (len(labels) - 1) / 2) * width for j in range(len(tasks))], [100 * v for v in values],
               width, label=label, color=f"C{i}")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Zero-shot accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------- reports
def render_figures(reports: Reports, details: Optional[ReportDetails] = None) -> dict[str, bytes]:
    """PNG bytes of every figure that applies: file name -> content (none without matplotlib)."""
    reports = _as_mapping(reports)
    details = details or ReportDetails()
    if not is_available("matplotlib"):
        logger.info('report.html without figures: pip install "optimum-d2prune[report]" for them.')
        return {}
    perplexities, zero_shot = details.curves(), details.zero_shot
    figures = {
        "layer_errors.png": plot_layer_errors(reports),
        "attention_choices.png": plot_attention_choices(reports),
        "module_sparsity.png": plot_module_sparsity(reports),
    }
    if perplexities:
        figures["perplexity.png"] = plot_perplexity(perplexities)
    if zero_shot is not None:
        zs = zero_shot if isinstance(zero_shot, Mapping) else {next(iter(reports)): zero_shot}
        figures["zero_shot.png"] = plot_zero_shot(zs)
    out = {}
    for name, fig in figures.items():
        if fig is not None:
            out[name] = _png(fig)
    return out


def render_report(reports: Reports, details: Optional[ReportDetails] = None, title: str = "D²Prune report",
                  format: str = "html") -> dict[str, Union[str, bytes]]:
    """The report files: `{"report.html": ...}` (PNGs embedded) or, with `format="markdown"`, `report.md` plus
    the PNGs it links.

    Args:
        reports: one `PruneReport`, a list, or a mapping label -> report (compared in every figure).
        details: how the runs were made and what was measured (`ReportDetails`).
    """
    if format not in ("html", "markdown"):
        raise ValueError(f'`format` must be "html" or "markdown", got {format!r}.')
    reports = _as_mapping(reports)
    details = details or ReportDetails()
    figures = render_figures(reports, details)
    zero_shot = details.zero_shot
    zs = {} if zero_shot is None else (zero_shot if isinstance(zero_shot, Mapping) else {next(iter(reports)): zero_shot})
    table = _markdown_table(("metric", "dense", "pruned", "measured on"), details.evaluation_rows())
    facts = [f"Calibration: {details.calibration_text()}" if details.calibration else "",
             f"Command: `{details.command}`" if details.command else ""]
    captions = {
        "layer_errors.png": "Relative reconstruction error of every pruned matrix on the calibration data.",
        "attention_choices.png": "Which of q, k, v was pruned without weight update in each block.",
        "module_sparsity.png": "Achieved sparsity of every pruned matrix.",
        "perplexity.png": "Perplexity against sparsity.",
        "zero_shot.png": "Zero-shot accuracy per task.",
    }
    if format == "markdown":
        parts = [f"# {title}", "", *[f for f in facts if f], ""]
        if table:
            parts += ["## Evaluation", "", table, ""]
        for label, r in reports.items():
            parts += [f"## {label}", "", "```", r.summary(), "```", "", r.block_table(), ""]
        for name in figures:
            parts += [f"![{captions[name]}]({name})", "", captions[name], ""]
        for label, results in zs.items():
            parts += [f"## Zero-shot: {label}", "", results.table(), ""]
        for label, r in reports.items():
            parts += [f"## Layers: {label}", "", r.layer_table(), "", r.attention_table(), ""]
        files: dict[str, Union[str, bytes]] = {"report.md": "\n".join(parts)}
        files.update(figures)
        return files
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f"<p>{html.escape(f)}</p>" for f in facts if f]
    if table:
        body.append(f"<h2>Evaluation</h2><pre>{html.escape(table)}</pre>")
    for label, r in reports.items():
        body.append(f"<h2>{html.escape(label)}</h2><pre>{html.escape(r.summary())}</pre>")
        if r.block_table():  # per-block budgets (non-uniform allocation) and block-level refit errors
            body.append(f"<pre>{html.escape(r.block_table())}</pre>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(captions[name])}</figcaption></figure>")
    for label, results in zs.items():
        body.append(f"<h2>Zero-shot: {html.escape(label)}</h2><pre>{html.escape(results.table())}</pre>")
    for label, r in reports.items():
        body.append(f"<details><summary>Per-layer table: {html.escape(label)}</summary>"
                    f"<pre>{html.escape(r.layer_table())}\n\n{html.escape(r.attention_table())}</pre></details>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}img{max-width:100%}"
            "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}figcaption{color:#555}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    return {"report.html": page}


def write_report(out_dir: Union[str, os.PathLike], reports: Reports, details: Optional[ReportDetails] = None,
                 format: str = "html", overwrite: bool = False) -> list[Path]:
    """Write `render_report`'s files into `out_dir` (created if needed); existing files are refused unless
    `overwrite=True`. Returns the written paths.

    Example:
    ```python
    >>> from optimum_d2prune.report.html import write_report
    >>> write_report("runs/report", {"D²Prune": d2_report, "SparseGPT": sgpt_report}, format="markdown")
    ```
    """
    files = render_report(reports, details, format=format)
    out = Path(out_dir)
    clashes = [str(out / n) for n in files if (out / n).exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"{clashes} already exist: choose another folder or pass `overwrite=True`.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        path = out / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        written.append(path)
    logger.info("Wrote %s", ", ".join(str(p) for p in written))
    return written


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
