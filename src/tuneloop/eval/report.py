"""Reports: a rich table for the terminal, report.json for machines, report.html (with plots) for people."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..fileio import write_text_atomic
from ..plots import figure_png
from ..runs import REPORT_HTML
from .schema import Report, write_report_json


def trust_html(report: dict) -> str:
    """The slices (with their plot), bias probes and forgetting sections of any task's report."""
    from .forgetting import forgetting_html
    from .probes import probes_html
    from .slices import slices_html

    return slices_html(report) + probes_html(report) + forgetting_html(report)


def print_table(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    labels = report["labels"]
    table = Table(title=f"{report.get('title', 'evaluation')} — {report['test']['n']} test records")
    table.add_column("system", style="bold")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    for l in labels:
        table.add_column(f"{l} P/R/F1", justify="right")
    table.add_column("wall s", justify="right")
    for name, s in report["systems"].items():
        cells = [f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}"]
        for l in labels:
            c = s["per_class"][l]
            cells.append(f"{c['precision']:.3f}/{c['recall']:.3f}/{c['f1']:.3f}")
        cells.append(f"{s['wall_seconds']:.1f}")
        table.add_row(name, *cells)
    console.print(table)


def confusion_png(confusion: list[list[int]], labels: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(labels), 3.0 + 0.4 * len(labels)), dpi=110)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max(max(r) for r in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    return figure_png(fig)


def render_html(report: dict) -> str:
    labels = report["labels"]
    e = html.escape
    rows = []
    for name, s in report["systems"].items():
        per = "".join(
            f"<td>{s['per_class'][l]['precision']:.3f}</td><td>{s['per_class'][l]['recall']:.3f}</td>"
            f"<td>{s['per_class'][l]['f1']:.3f}</td>" for l in labels
        )
        rows.append(f"<tr><th>{e(name)}</th><td>{s['accuracy']:.4f}</td><td>{s['macro_f1']:.4f}</td>{per}"
                    f"<td>{s['wall_seconds']:.1f}</td></tr>")
    head2 = "".join(f"<th colspan=3>{e(l)}</th>" for l in labels)
    head3 = "<th>P</th><th>R</th><th>F1</th>" * len(labels)
    plots = []
    for name, s in report["systems"].items():
        png = base64.b64encode(confusion_png(s["confusion"], labels, name)).decode()
        plots.append(f'<figure><img alt="confusion matrix of {e(name)}" src="data:image/png;base64,{png}">'
                     f"<figcaption>{e(name)}</figcaption></figure>")
    notes = "".join(f"<li>{e(n)}</li>" for n in report.get("notes", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report.get('title', 'tuneloop report'))}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}} th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1rem}} .meta{{color:#555}} tr.bad td{{background:#fbe3e1}}
</style></head><body>
<h1>{e(report.get('title', 'tuneloop report'))}</h1>
<p class="meta">run <code>{e(str(report.get('run', '')))}</code> · model <code>{e(str(report.get('model', '')))}</code>
 · test <code>{e(str(report['test']['path']))}</code> ({report['test']['n']} records)
 · total wall {report.get('wall_seconds', 0):.1f} s</p>
{_headline_html(report)}
<table><tr><th rowspan=2>system</th><th rowspan=2>accuracy</th><th rowspan=2>macro-F1</th>{head2}
<th rowspan=2>wall s</th></tr><tr>{head3}</tr>{''.join(rows)}</table>
<h2>Confusion matrices</h2>{''.join(plots)}
{trust_html(report)}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""


def _headline_html(report: dict) -> str:
    h = report.get("headline")
    if not h:
        return ""
    e = html.escape
    better = "higher" if h["direction"] == "higher" else "lower"
    values = " · ".join(f"{e(n)} <b>{v:.4f}</b>" if v is not None else f"{e(n)} -" for n, v in h["values"].items())
    return f'<p class="headline">{e(h["metric"])} ({better} is better): {values}</p>'


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """report.json (checked against the one schema) and report.html, each written atomically."""
    j = write_report_json(Report.model_validate(report), out_dir)
    h = write_text_atomic(Path(out_dir) / REPORT_HTML, render_html(report))
    return j, h
