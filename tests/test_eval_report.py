"""The evaluation report as people read it: the console tables fit 80 columns, the HTML of every task shows
intervals, paired tests, calibration and cost, `tuneloop report RUN` rebuilds it from report.json (old
reports too), and (browser tier) headless Chromium renders it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from data_helpers import run_cli  # one way to call the real CLI
from tuneloop.eval import schema
from tuneloop.eval.calibration import calibration_summary
from tuneloop.eval.cost import BatchTimer, error_cost_matrix, system_cost
from tuneloop.eval.metrics import classification_metrics
from tuneloop.eval.report import print_table, render_html, write_report
from tuneloop.eval.schema import Report, headline, keyed, make_examples
from tuneloop.eval.stats import default_pairs, report_statistics

LABELS = ["complaint", "praise", "question"]
SYSTEMS = {"base": 0.45, "base_fewshot": 0.6, "tuned": 0.9, "tfidf_logreg": 0.75}


def classify_report(n: int = 120) -> dict:
    """A complete classify report of four systems (each right with its own probability), built with the
    functions the evaluator uses."""
    rng = np.random.default_rng(0)
    gold = [LABELS[i % 3] for i in range(n)]
    examples = make_examples([f"message {i}" for i in range(n)], gold)
    systems, preds, cal, cost = {}, {}, {}, {}
    costs = error_cost_matrix({"complaint->praise": 20, "question": 1}, LABELS)
    for name, acc in SYSTEMS.items():
        right = rng.random(n) < acc
        pred = [g if r else LABELS[(LABELS.index(g) + 1) % 3] for g, r in zip(gold, right)]
        conf = np.clip(np.where(right, rng.uniform(0.6, 1.0, n), rng.uniform(0.34, 0.8, n)), 0, 1)
        m = classification_metrics(gold, pred, LABELS)
        m.update(wall_seconds=0.5, records_per_second=n / 0.5)
        systems[name] = m
        preds[name] = keyed(examples, [{"label": p, "probability": float(c), "correct": p == g}
                                       for p, c, g in zip(pred, conf, gold)])
        cal[name] = calibration_summary(conf, right, abstain_below=0.7)
        t = BatchTimer()
        t.batches = [(32, 0.05 * (1 + j % 3)) for j in range(n // 32)] + [(n % 32, 0.02)]
        cost[name] = system_cost(t, None, "cpu", m["confusion"], costs)
    rep = Report(task="classify", title="support-triage: base vs tuned vs classical baseline", run="runs/x",
                 model="smollm2-135m-instruct", labels=LABELS, systems=systems,
                 headline=headline(systems, "accuracy", "higher"),
                 test=schema.TestSet(path="test.jsonl", n=n, fingerprint="f" * 64), examples=examples,
                 predictions=preds, calibration=cal, cost=cost,
                 settings={"base_fewshot": {"prompt": "Text: hello\nAnswer: praise\n\nText: {text}\nAnswer:",
                                            "k": 1, "shot_labels": ["praise"], "n": n,
                                            "calibration": "contextual",
                                            "content_free_prior": {l: 1 / 3 for l in LABELS},
                                            "content_free": ["N/A", "", "[MASK]"]}}).model_dump(mode="json")
    rep.update(report_statistics(rep, default_pairs(list(systems)), samples=300))
    return rep


def test_the_console_tables_fit_80_columns_and_cut_no_cell():
    out = Console(width=80, record=True, force_terminal=False)
    print_table(classify_report(), out)
    text = out.export_text()
    lines = text.splitlines()
    assert max(len(l) for l in lines) <= 80
    assert "…" not in text
    # one row per class and system, and a row per paired test
    assert sum(l.split()[1:2] == ["tuned"] or l.split()[:1] == ["tuned"] for l in lines if l.strip()) >= 4
    assert "tuned vs base_fewshot" in text and "McNemar" in text


def test_the_html_shows_intervals_tests_calibration_cost_and_the_prompt():
    rep = classify_report()
    page = render_html(rep)
    for section in ("Paired tests", "Calibration", "Speed and cost", "Prompts", "Confusion matrices"):
        assert f"<h2>{section}</h2>" in page
    lo, hi = rep["intervals"]["tuned"]["accuracy"]
    assert f"[{lo:.4f}, {hi:.4f}]" in page
    assert page.count("data:image/png;base64,") == 5  # four confusion matrices and the reliability diagram
    assert "Text: {text}" in page and "cost of errors / 1,000" in page


@pytest.mark.parametrize("task", ["regress", "sft"])
def test_other_tasks_get_the_same_sections(task, tmp_path):
    n = 60
    rng = np.random.default_rng(1)
    if task == "regress":
        refs = [100.0 + i for i in range(n)]
        rows = {s: [{"value": r + e, "abs_error": abs(e)} for r, e in zip(refs, rng.normal(0, k, n))]
                for s, k in (("tuned", 3.0), ("seasonal_naive", 6.0))}
        systems = {s: {"n": n, "mae": float(np.mean([p["abs_error"] for p in v]))} for s, v in rows.items()}
        metric, direction = "mae", "lower"
    else:
        refs = [f"answer {i}" for i in range(n)]
        rows = {s: [{"text": "x", "rougeL": float(v), "loss": 1.5, "tokens": 7} for v in rng.uniform(lo, lo + .4, n)]
                for s, lo in (("base", 0.1), ("tuned", 0.3))}
        systems = {s: {"rougeL": float(np.mean([p["rougeL"] for p in v])), "perplexity": float(np.exp(1.5))}
                   for s, v in rows.items()}
        metric, direction = "rougeL", "higher"
    examples = make_examples([f"in {i}" for i in range(n)], refs)
    rep = Report(task=task, title=f"{task} report", run="r", model="m", systems=systems,
                 headline=headline(systems, metric, direction),
                 test=schema.TestSet(path="t", n=n, fingerprint=None), examples=examples,
                 predictions={s: keyed(examples, v) for s, v in rows.items()}).model_dump(mode="json")
    rep.update(report_statistics(rep, samples=300))
    (t,) = [t for t in rep["tests"] if t["metric"] == metric]
    assert t["better"] == "tuned" and t["p_value"] < 0.01
    if task == "sft":  # perplexity from summed NLL over summed tokens
        assert rep["intervals"]["tuned"]["perplexity"] == pytest.approx([np.exp(1.5)] * 2)
    write_report(rep, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Paired tests</h2>" in page and page.count('class="ci"') >= 2


@pytest.mark.slow
def test_tuneloop_report_rebuilds_the_html_from_json_old_reports_too(tmp_path):
    rep = classify_report()
    write_report(rep, tmp_path)
    (tmp_path / "report.html").unlink()
    code, out = run_cli("report", str(tmp_path))
    assert code == 0, out
    assert "<h2>Paired tests</h2>" in (tmp_path / "report.html").read_text()
    # a report from before intervals, tests, calibration and cost existed still loads and renders
    old = {k: v for k, v in rep.items() if k not in ("intervals", "tests", "statistics", "calibration", "cost")}
    (tmp_path / "report.json").write_text(json.dumps(old))
    code, out = run_cli("report", str(tmp_path))
    assert code == 0, out
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Paired tests</h2>" not in page and "<h2>Confusion matrices</h2>" in page
    # a damaged one names the file and the field, no traceback
    (tmp_path / "report.json").write_text(json.dumps({**old, "systems": 3}))
    code, out = run_cli("report", str(tmp_path))
    assert code != 0 and "report.json: systems:" in out and "Traceback" not in out
    code, out = run_cli("report", str(tmp_path / "nowhere"), "-w", str(tmp_path))
    assert code != 0 and "Traceback" not in out


CHROMIUM = "/usr/bin/chromium"


def _playwright_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs playwright (pip install playwright; the browser is Debian's chromium, never downloaded)"
    if not Path(CHROMIUM).exists():
        return f"needs Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.mark.browser
@pytest.mark.skipif(_playwright_missing() is not None, reason=_playwright_missing() or "")
def test_the_eval_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    write_report(classify_report(), tmp_path)
    shot = tmp_path / "eval-report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto((tmp_path / "report.html").as_uri())
            # every plot decoded and drawn (a broken data: URI has naturalWidth 0)
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert len(widths) == 5 and min(widths) > 100
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            assert {"Paired tests", "Calibration", "Speed and cost"} <= set(headings)
            page.locator("details summary").first.click()
            assert page.locator("details pre").first.is_visible()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    # the screenshot is the artifact a reviewer looks at: kept where CI collects them, when it says where
    if os.environ.get("TUNELOOP_ARTIFACTS"):
        shutil.copy(shot, Path(os.environ["TUNELOOP_ARTIFACTS"]) / shot.name)
