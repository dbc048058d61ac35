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
figure{{display:inline-block;margin:1rem}} .meta{{color:#555}}
</style></head><body>
<h1>{e(report.get('title', 'tuneloop report'))}</h1>
<p class="meta">run <code>{e(str(report.get('run', '')))}</code> · model <code>{e(str(report.get('model', '')))}</code>
 · test <code>{e(str(report['test']['path']))}</code> ({report['test']['n']} records)
 · total wall {report.get('wall_seconds', 0):.1f} s</p>
{_headline_html(report)}
<table><tr><th rowspan=2>system</th><th rowspan=2>accuracy</th><th rowspan=2>macro-F1</th>{head2}
<th rowspan=2>wall s</th></tr><tr>{head3}</tr>{''.join(rows)}</table>
<h2>Confusion matrices</h2>{''.join(plots)}
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


# dpo / kto / reward reports: the metrics shown, in order, with the way that is better
PREFERENCE_COLUMNS = (("preference_accuracy", "preference accuracy", "higher"),
                      ("likelihood_accuracy", "likelihood accuracy", "higher"),
                      ("reward_margin", "reward margin (nats)", "higher"),
                      ("win_rate_vs_parent", "win rate vs parent", "higher"),
                      ("win_rate_vs_base", "win rate vs base", "higher"),
                      ("judge_score", "judge score", "higher"),
                      ("rougeL", "ROUGE-L", "higher"),
                      ("perplexity", "perplexity", "lower"),
                      ("mean_margin", "mean margin", "higher"),
                      ("mean_answer_words", "words / answer", None))


def render_preference_html(report: dict, examples_shown: int = 12) -> str:
    """The preference section: every system's metrics with their intervals, the paired tests, and the first
    held-out pairs with each system's answer and its judge score, so a reader sees what the numbers count."""
    e = html.escape
    systems = report["systems"]
    cols = [c for c in PREFERENCE_COLUMNS if any(m.get(c[0]) is not None for m in systems.values())]
    ref = report.get("settings", {}).get("reference")
    iv = report.get("intervals") or {}

    def cell(name: str, key: str, v) -> str:
        if key == "preference_accuracy" and name == ref:
            return "<td>reference</td>"
        if v is None:
            return "<td>-</td>"
        i = iv.get(name, {}).get(key)
        return f"<td>{v:.4f}" + (f" <small>[{i[0]:.3f}, {i[1]:.3f}]</small>" if i else "") + "</td>"

    head = "".join(f"<th>{e(label)} {'↑' if d == 'higher' else '↓' if d == 'lower' else ''}</th>"
                   for _, label, d in cols)
    rows = "".join(f"<tr><th>{e(n)}</th>{''.join(cell(n, k, m.get(k)) for k, _, _ in cols)}</tr>"
                   for n, m in systems.items())
    tests = "".join(
        f"<tr><th>{e(t['a'])} vs {e(t['b'])}</th><td>{e(t['metric'])}</td><td>{t['delta']:+.4f}</td>"
        f"<td>[{t['interval'][0]:+.3f}, {t['interval'][1]:+.3f}]</td><td>{t['p_value']:.3g}</td></tr>"
        for t in report.get("tests") or [])
    preds = report.get("predictions") or {}
    shown = []
    for ex in report["examples"][:examples_shown]:
        answers = "".join(
            f"<dt>{e(n)}" + (f" <small>judge {p['judge']:+.2f}</small>" if p and p.get("judge") is not None else "")
            + f"</dt><dd>{e(p.get('text') or '') if p else '-'}</dd>"
            for n, by_id in preds.items() for p in [by_id.get(ex["id"])] if p and "text" in p)
        shown.append(f"<details><summary>{e(str(ex['id']))}</summary><dl><dt>chosen (reference)</dt>"
                     f"<dd>{e(str(ex['reference']))}</dd><dt>rejected</dt><dd>{e(str(ex['meta'].get('rejected', '')))}"
                     f"</dd>{answers}</dl></details>")
    notes = "".join(f"<li>{e(n)}</li>" for n in report.get("notes", []))
    settings = ", ".join(f"{e(k)}: <code>{e(str(v))}</code>" for k, v in (report.get("settings") or {}).items()
                         if v is not None)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report.get('title', 'tuneloop report'))}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:80rem}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}} th:first-child{{text-align:left}}
.meta{{color:#555}} dt{{font-weight:bold;margin-top:.4rem}} dd{{margin-left:1rem;white-space:pre-wrap}}
</style></head><body>
<h1>{e(report.get('title', 'tuneloop report'))}</h1>
<p class="meta">run <code>{e(str(report.get('run', '')))}</code> · model <code>{e(str(report.get('model', '')))}</code>
 · held-out pairs <code>{e(str(report['test']['path']))}</code> ({report['test']['n']})
 · total wall {report.get('wall_seconds', 0):.1f} s</p>
<p class="meta">{settings}</p>
{_headline_html(report)}
<h2>Preference and task metrics</h2>
<table><tr><th>system</th>{head}</tr>{rows}</table>
<p class="meta">[low, high]: 95% bootstrap interval over the held-out pairs.</p>
{f'<h2>Paired tests</h2><table><tr><th>pair</th><th>metric</th><th>delta</th><th>interval</th><th>p</th></tr>{tests}</table>' if tests else ''}
{f'<h2>Held-out examples</h2>{"".join(shown)}' if shown else ''}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""


def write_report(report: dict, out_dir: Path, render=render_html) -> tuple[Path, Path]:
    """report.json (checked against the one schema) and report.html (`render`: the task's page), each
    written atomically."""
    j = write_report_json(Report.model_validate(report), out_dir)
    h = write_text_atomic(Path(out_dir) / REPORT_HTML, render(report))
    return j, h
