"""Reports: a rich table for the terminal, report.json for machines, report.html (with plots) for people."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from ..fileio import write_text_atomic
from ..plots import figure_png
from ..runs import REPORT_HTML
from .schema import Report, write_report_json


def _ci(report: dict, system: str, metric: str, fmt: str = ".3f") -> str:
    iv = (report.get("intervals") or {}).get(system, {}).get(metric)
    return f" [{iv[0]:{fmt}}, {iv[1]:{fmt}}]" if iv else ""


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


TEST_NAMES = {"mcnemar_exact": "McNemar", "paired_bootstrap": "bootstrap"}


def print_tests(report: dict, console: Console) -> None:
    """The paired tests, one row per pair and metric, readable in 80 columns."""
    tests = report.get("tests") or []
    if not tests:
        return
    t = Table(title="paired tests: a - b with its 95% interval", box=box.SIMPLE_HEAD, pad_edge=False,
              caption="p: McNemar's exact test (*) for accuracy, a paired bootstrap for the rest")
    for c, j in (("a vs b", "left"), ("metric", "left"), ("delta [95% CI]", "right"), ("p", "right")):
        t.add_column(c, justify=j, no_wrap=True)
    for r in tests:
        lo, hi = r["interval"]
        t.add_row(f"{r['a']} vs {r['b']}", r["metric"], f"{r['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                  _p(r["p_value"]) + ("*" if r["test"] == "mcnemar_exact" else " "))
    console.print(t)


def print_table(report: dict, console: Console | None = None) -> None:
    """Classify: systems (accuracy with its interval, macro-F1, ECE, speed), then one row per class and
    system, then the paired tests; every table fits an 80-column terminal or log."""
    console = console or Console()
    labels = report["labels"]
    table = Table(title=f"{report.get('title', 'evaluation')} — {report['test']['n']} test records",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for c in ("system", "n", "accuracy [95% CI]", "macro-F1", "ECE", "rec/s"):
        table.add_column(c, justify="left" if c == "system" else "right", no_wrap=True)
    for name, s in report["systems"].items():
        cal = (report.get("calibration") or {}).get(name)
        speed = (report.get("cost") or {}).get(name, {}).get("records_per_second") or s.get("records_per_second")
        table.add_row(name, str(s["n"]), f"{s['accuracy']:.3f}{_ci(report, name, 'accuracy')}",
                      f"{s['macro_f1']:.3f}", f"{cal['ece']:.3f}" if cal else "-",
                      f"{speed:,.0f}" if speed else "-")
    console.print(table)
    per = Table(title="per class", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in ("class", "system", "precision", "recall", "F1", "support"):
        per.add_column(c, justify="left" if c in ("class", "system") else "right", no_wrap=True)
    for l in labels:
        for name, s in report["systems"].items():
            c = s["per_class"][l]
            per.add_row(l if name == next(iter(report["systems"])) else "", name, f"{c['precision']:.3f}",
                        f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    console.print(per)
    print_tests(report, console)
    print_cost(report, console)


def print_cost(report: dict, console: Console) -> None:
    cost = report.get("cost") or {}
    if not cost:
        return
    t = Table(title="speed and cost", box=box.SIMPLE_HEAD, pad_edge=False)
    business = any("business_cost" in c for c in cost.values())
    cols = ["system", "rec/s", "p50 ms", "p95 ms", "$ / 1k"] + (["errors $ / 1k"] if business else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "system" else "right", no_wrap=True)
    for name, c in cost.items():
        row = [name, f"{c['records_per_second']:,.1f}" if c.get("records_per_second") else "-",
               f"{c['p50_ms']:,.0f}" if c.get("p50_ms") is not None else "-",
               f"{c['p95_ms']:,.0f}" if c.get("p95_ms") is not None else "-",
               f"{c['cost_per_1000']:.4f}" if c.get("cost_per_1000") is not None else "-"]
        if business:
            bc = (c.get("business_cost") or {}).get("per_1000")
            row.append(f"{bc:,.1f}" if bc is not None else "-")
        t.add_row(*row)
    console.print(t)
    first = next(iter(cost.values()))
    console.print(f"at {first.get('price_per_hour')}/hour ({first.get('price_source')}); latency: a record's "
                  f"batch's time", style="dim")


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


def _num(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    return f"{v:,}" if isinstance(v, int) else f"{v:,.4f}"


def _systems_html(report: dict) -> str:
    """The systems' metrics: classify with per-class P/R/F1 and support, other tasks every scalar metric; each with
    its 95% interval where the report has one."""
    e = html.escape
    iv = report.get("intervals") or {}

    def cell(name: str, metric: str, v, extra: str = "") -> str:
        r = iv.get(name, {}).get(metric)
        band = f'<br><small class="ci">[{r[0]:.4f}, {r[1]:.4f}]</small>' if r else ""
        return f"<td>{_num(v)}{band}{extra}</td>"

    if report["task"] == "classify":
        labels = report["labels"]
        rows = []
        for name, s in report["systems"].items():
            per = "".join(
                f"<td>{s['per_class'][l]['precision']:.3f}</td><td>{s['per_class'][l]['recall']:.3f}</td>"
                f"<td>{s['per_class'][l]['f1']:.3f}</td><td>{s['per_class'][l]['support']}</td>" for l in labels
            )
            unc = (f'<br><small>uncalibrated {s["uncalibrated_accuracy"]:.4f}</small>'
                   if "uncalibrated_accuracy" in s else "")
            rows.append(f"<tr><th>{e(name)}</th><td>{s['n']}</td>{cell(name, 'accuracy', s['accuracy'], unc)}"
                        f"{cell(name, 'macro_f1', s['macro_f1'])}{per}<td>{s['wall_seconds']:.1f}</td></tr>")
        # support beside recall: a class's recall on 6 examples moves in steps of 0.17
        head2 = "".join(f"<th colspan=4>{e(l)}</th>" for l in labels)
        head3 = "<th>P</th><th>R</th><th>F1</th><th>n</th>" * len(labels)
        return (f"<table><tr><th rowspan=2>system</th><th rowspan=2>n</th><th rowspan=2>accuracy</th>"
                f"<th rowspan=2>macro-F1</th>{head2}<th rowspan=2>wall s</th></tr><tr>{head3}</tr>"
                f"{''.join(rows)}</table>")
    metrics: list[str] = []
    for s in report["systems"].values():
        metrics += [k for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k not in metrics]
    head = "".join(f"<th>{e(m)}</th>" for m in metrics)
    rows = "".join(f"<tr><th>{e(name)}</th>" + "".join(cell(name, m, s.get(m, "-")) for m in metrics) + "</tr>"
                   for name, s in report["systems"].items())
    return f"<table><tr><th>system</th>{head}</tr>{rows}</table>"


def _tests_html(report: dict) -> str:
    tests = report.get("tests") or []
    if not tests:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(t['a'])} vs {e(t['b'])}</th><td>{e(t['metric'])}</td><td>{t['n']}</td>"
        f"<td>{t['a_value']:.4f}</td><td>{t['b_value']:.4f}</td><td>{t['delta']:+.4f}</td>"
        f"<td>[{t['interval'][0]:+.4f}, {t['interval'][1]:+.4f}]</td><td>{e(TEST_NAMES.get(t['test'], t['test']))}"
        f"{' (' + str(t['discordant'][0]) + ' vs ' + str(t['discordant'][1]) + ' discordant)' if t.get('discordant') else ''}"
        f"</td><td>{_p(t['p_value'])}</td><td>{e(str(t.get('better') or '-'))}</td></tr>" for t in tests)
    st = report.get("statistics") or {}
    return (f"<h2>Paired tests</h2><p class=meta>on the examples both systems predicted · {e(str(st.get('paired', '')))}"
            f" · intervals: {e(str(st.get('interval', '')))}, {st.get('resamples', '')} resamples</p>"
            f"<table><tr><th>a vs b</th><th>metric</th><th>n</th><th>a</th><th>b</th><th>a − b</th><th>95% interval</th>"
            f"<th>test</th><th>p</th><th>better</th></tr>{rows}</table>")


def _calibration_html(report: dict) -> str:
    cal = report.get("calibration") or {}
    if not cal:
        return ""
    from .calibration import reliability_png

    e = html.escape
    below = next((c["abstain"]["below"] for c in cal.values() if "abstain" in c), None)
    rows = ""
    for name, c in cal.items():
        a = c.get("abstain")
        ab = (f"<td>{a['coverage']:.3f}</td><td>{_num(a['accuracy'])}</td><td>{a['abstained']}</td>"
              if a else "")
        rows += f"<tr><th>{e(name)}</th><td>{c['ece']:.4f}</td>{ab}</tr>"
    ab_head = (f"<th>coverage at {below:g}</th><th>accuracy answered</th><th>sent to a person</th>"
               if below is not None else "")
    png = base64.b64encode(reliability_png(cal, below)).decode()
    return (f"<h2>Calibration</h2><p class=meta>expected calibration error over 10 confidence bins; "
            f"abstaining below a confidence trades coverage for accuracy</p>"
            f"<table><tr><th>system</th><th>ECE</th>{ab_head}</tr>{rows}</table>"
            f'<figure><img alt="reliability diagram and coverage vs accuracy" src="data:image/png;base64,{png}">'
            f"</figure>")


def _cost_html(report: dict) -> str:
    cost = report.get("cost") or {}
    if not cost:
        return ""
    e = html.escape
    business = any("business_cost" in c for c in cost.values())
    rows = ""
    for name, c in cost.items():
        bc = (c.get("business_cost") or {}).get("per_1000")
        rows += (f"<tr><th>{e(name)}</th><td>{_num(c.get('records_per_second'))}</td><td>{_num(c.get('p50_ms'))}</td>"
                 f"<td>{_num(c.get('p95_ms'))}</td><td>{_num(c.get('batch_size'))}</td>"
                 f"<td>{_num(c.get('cost_per_1000'))}</td>" + (f"<td>{_num(bc)}</td>" if business else "") + "</tr>")
    first = next(iter(cost.values()))
    return (f"<h2>Speed and cost</h2><p class=meta>at {_num(first.get('price_per_hour'))} per hour "
            f"({e(str(first.get('price_source')))}); a record's latency is its batch's wall time</p>"
            f"<table><tr><th>system</th><th>records/s</th><th>p50 ms</th><th>p95 ms</th><th>batch</th>"
            f"<th>cost / 1,000</th>{'<th>cost of errors / 1,000</th>' if business else ''}</tr>{rows}</table>")


def _prompts_html(report: dict) -> str:
    e = html.escape
    out = ""
    for name, st in (report.get("settings") or {}).items():
        if isinstance(st, dict) and st.get("prompt"):
            prior = st.get("content_free_prior")
            cal = (f" · calibrated: the prior on content-free inputs "
                   f"{e(', '.join(repr(x) for x in st.get('content_free', [])))} divided out: "
                   + e(", ".join(f"{k} {v:.3f}" for k, v in prior.items())) if prior else " · uncalibrated")
            out += (f"<details><summary>{e(name)}: {st.get('k', 0)} examples in the prompt, "
                    f"{st.get('n', '')} test records{cal}</summary><pre>{e(st['prompt'])}</pre></details>")
    return f"<h2>Prompts</h2>{out}" if out else ""


def trust_html(report: dict) -> str:
    """The slices (with their plot), bias probes and forgetting sections of any task's report."""
    from .forgetting import forgetting_html
    from .probes import probes_html
    from .slices import slices_html

    return slices_html(report) + probes_html(report) + forgetting_html(report)


def render_html(report: dict) -> str:
    e = html.escape
    plots = []
    if report["task"] == "classify":
        for name, s in report["systems"].items():
            png = base64.b64encode(confusion_png(s["confusion"], report["labels"], name)).decode()
            plots.append(f'<figure><img alt="confusion matrix of {e(name)}" src="data:image/png;base64,{png}">'
                         f"<figcaption>{e(name)}</figcaption></figure>")
    notes = "".join(f"<li>{e(n)}</li>" for n in report.get("notes", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(report.get('title', 'tuneloop report'))}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}} table{{border-collapse:collapse;margin:.5rem 0}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}} th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1rem}} .meta{{color:#555}} .ci{{color:#666}} tr.bad td{{background:#fbe3e1}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:.5rem;max-height:24rem;overflow:auto}}
</style></head><body>
<h1>{e(report.get('title', 'tuneloop report'))}</h1>
<p class="meta">run <code>{e(str(report.get('run', '')))}</code> · model <code>{e(str(report.get('model', '')))}</code>
 · test <code>{e(str(report['test']['path']))}</code> ({report['test']['n']} records)
 · total wall {report.get('wall_seconds', 0):.1f} s</p>
{_headline_html(report)}
{f'<p class="meta">{e(budget_summary(report))}</p>' if report.get('budget') else ''}
{_systems_html(report)}
<p class="meta">small print under a value: its 95% bootstrap interval</p>
{_tests_html(report)}
{_calibration_html(report)}
{_cost_html(report)}
{_prompts_html(report)}
{f'<h2>Confusion matrices</h2>{"".join(plots)}' if plots else ''}
{trust_html(report)}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""


def budget_summary(report: dict) -> str:
    """One line: the budget, what it cut, the accuracy reached, the wall time it really took."""
    from ..config import format_seconds

    b, tuned = report["budget"], report["systems"].get("tuned", {})
    t = b.get("train") or {}
    stopped, trained = t.get("stopped_at_budget"), t.get("trained_rows", t.get("kept"))
    if stopped and trained is not None and trained < t["kept"]:
        # slower than the probe measured: the run stopped before it read every review the plan kept
        cut = (f"trained on {trained:,} of {t['rows_total']:,} reviews (the plan kept {t['kept']:,}; stopped at step "
               f"{stopped} of {t['steps']} when the training budget ran out)")
    else:
        if t.get("decision") == "fewer examples":
            cut = (f"trained on {t['kept']:,} of {t['rows_total']:,} reviews (the budget left out "
                   f"{t['rows_total'] - t['kept']:,})")
        elif t.get("decision") == "fewer epochs":
            cut = f"trained {t['steps']:,} of {t['steps_asked']:,} steps on every review"
        else:
            cut = "every review trained on, nothing cut"
        if stopped:
            cut += f"; stopped at step {stopped} when the training budget ran out"
    if b.get("test_sample"):
        cut += f"; evaluated on a stratified {b['test_sample']:,} of the {b['test_total']:,} test reviews"
    acc = f"tuned accuracy {tuned['accuracy']:.3f}" if "accuracy" in tuned else "tuned model evaluated"
    return (f"budget {format_seconds(b['total_s'])}: {cut}; {acc}; wall time {format_seconds(b['wall_s'])} "
            f"(evaluation estimated {format_seconds(b['eval_estimate_s'])})")


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
                      ("label_accuracy", "label accuracy", "higher"),
                      ("desirable_reward", "reward of desirable (nats)", "higher"),
                      ("undesirable_reward", "reward of undesirable (nats)", "lower"),
                      ("win_rate_vs_parent", "win rate vs parent", "higher"),
                      ("win_rate_vs_base", "win rate vs base", "higher"),
                      ("judge_score", "judge score", "higher"),
                      ("rougeL", "ROUGE-L", "higher"),
                      ("perplexity", "perplexity", "lower"),
                      ("mean_margin", "mean margin", "higher"),
                      ("mean_answer_words", "words / answer", None))


def render_preference_html(report: dict, examples_shown: int = 12) -> str:
    """The preference section: every system's metrics with their intervals, the paired tests, and the first
    held-out pairs (or thumbs) with each system's answer and its judge score, so a reader sees what the
    numbers count."""
    e = html.escape
    systems = report["systems"]
    unit = "answers" if (report.get("headline") or {}).get("metric") == "label_accuracy" else "pairs"
    cols = [c for c in PREFERENCE_COLUMNS if any(m.get(c[0]) is not None for m in systems.values())]
    ref = report.get("settings", {}).get("reference")
    iv = report.get("intervals") or {}

    def cell(name: str, key: str, v) -> str:
        if key in ("preference_accuracy", "label_accuracy") and name == ref:
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
        if "label" in ex["meta"]:  # a thumb: one answer and its label
            label = str(ex["meta"]["label"])
            given = (f"<dt>completion ({e(label)}{', reference' if label == 'desirable' else ''})</dt>"
                     f"<dd>{e(str(ex['reference']))}</dd>")
        else:
            given = (f"<dt>chosen (reference)</dt><dd>{e(str(ex['reference']))}</dd><dt>rejected</dt>"
                     f"<dd>{e(str(ex['meta'].get('rejected', '')))}</dd>")
        shown.append(f"<details><summary>{e(str(ex['id']))}</summary><dl>{given}{answers}</dl></details>")
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
 · held-out {unit} <code>{e(str(report['test']['path']))}</code> ({report['test']['n']})
 · total wall {report.get('wall_seconds', 0):.1f} s</p>
<p class="meta">{settings}</p>
{_headline_html(report)}
<h2>Preference and task metrics</h2>
<table><tr><th>system</th>{head}</tr>{rows}</table>
<p class="meta">[low, high]: 95% bootstrap interval over the held-out {unit}.</p>
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


def rebuild_html(folder: Path) -> Path:
    """report.html again from the report.json in `folder` (a run folder, or an --out folder): after an
    upgrade of the page, or to render a report made elsewhere. A report that does not match the schema
    fails naming its file and field."""
    from pydantic import ValidationError

    from ..errors import ConfigError, NotFoundError
    from ..fileio import read_json
    from ..runs import REPORT_JSON

    f = Path(folder) / REPORT_JSON
    if not f.exists():
        raise NotFoundError(f"{f}: no report (run `tuneloop eval` first)")
    try:
        report = Report.model_validate(read_json(f)).model_dump(mode="json")
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{f}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    return write_text_atomic(Path(folder) / REPORT_HTML, render_html(report))
