"""The data report: what is in a file and what to fix first, as `report.json` (for machines) and
`report.html` (for people, plots embedded so the file stands alone)."""

from __future__ import annotations

import base64
import html
import statistics
from collections import Counter, defaultdict
from typing import Any

from ..plots import figure_png
from .bias_terms import BIAS_TERMS, categories_in
from .clean import _content_key, conflict_key, token_lengths
from .longdoc import long_input_check, long_input_lines
from .near import near_duplicates
from .pii import count_pii
from .validate import ReadResult

# The seeds' guidance on size: below these, fine-tuning tends to memorise rather than learn.
MIN_PER_CLASS = 500  # classification: examples per class
MIN_GENERATION = 1000  # generation (chat, prompt/completion, preference, text): examples in all
BIAS_RATIO = 2.0  # a category mentioned this many times more often under one label than another
BIAS_MIN_MENTIONS = 5  # ... with at least this many mentions, to keep noise out
EXAMPLES = 10  # examples kept per finding in the report
IMBALANCE_RATIO = 3  # strong imbalance: the largest class has at least this many times the smallest's examples


def strongly_imbalanced(counts: dict[str, int]) -> bool:
    """The data report's rule for strong class imbalance (training reads it too, to turn its corrections on)."""
    return bool(counts) and max(counts.values()) >= IMBALANCE_RATIO * min(counts.values())


def build_report(res: ReadResult, tokenizer: Any = None, model: str | None = None,
                 near_threshold: float = 0.85, max_tokens: int | None = None) -> dict[str, Any]:
    recs = res.records
    kinds = Counter(r.kind for r in recs)
    kind = kinds.most_common(1)[0][0] if kinds else None
    rep: dict[str, Any] = {
        "file": res.path, "format": res.format, "shape": res.shape, "task": kind,
        "counts": {"rows": res.rows, "usable": len(recs), "unusable": len(res.problems),
                   "augmented": sum(r.augmented_from is not None for r in recs)},
        "problems": res.problems[:200],
    }
    warnings: list[str] = []

    # label balance and size guidance
    if kind == "classify":
        labels = Counter(r.label for r in recs)
        rep["labels"] = dict(labels.most_common())
        small = {lab: n for lab, n in labels.items() if n < MIN_PER_CLASS}
        for lab, n in sorted(small.items(), key=lambda x: x[1]):
            warnings.append(f"class {lab!r} has {n} examples; aim for at least {MIN_PER_CLASS} per class")
        if strongly_imbalanced(labels):
            warnings.append(f"classes are imbalanced ({max(labels.values())} vs {min(labels.values())}); "
                            "report per-class F1, consider re-sampling or class weights")
    else:
        if len(recs) < MIN_GENERATION:
            warnings.append(f"{len(recs)} examples; aim for at least {MIN_GENERATION} for a generation task")
    if kind == "regress":
        vals = [r.value for r in recs]
        rep["values"] = {"min": min(vals), "max": max(vals), "mean": round(statistics.fmean(vals), 4),
                         "median": statistics.median(vals)}
        rep["_values"] = vals
    rep["size_warnings"] = warnings

    # token lengths
    lengths: list[int] = []
    if tokenizer is not None and recs:
        lengths = token_lengths(tokenizer, [r.all_text() for r in recs])
        srt = sorted(lengths)
        rep["tokens"] = {"model": model, "min": srt[0], "median": srt[len(srt) // 2],
                         "p95": srt[min(len(srt) - 1, int(len(srt) * 0.95))], "max": srt[-1],
                         "total": sum(srt)}
        if max_tokens is not None:
            over = [r.source for r, n in zip(recs, lengths) if n > max_tokens]
            rep["tokens"]["over_max"] = {"max_tokens": max_tokens, "count": len(over), "examples": over[:EXAMPLES]}
            rep["long_inputs"] = long_input_check([r.all_text() for r in recs],
                                                  [r.label for r in recs] if kind == "classify" else None,
                                                  lengths, max_tokens)

    # duplicates, near-duplicates, conflicting labels
    first: dict[str, str] = {}
    exact = []
    for r in recs:
        k = _content_key(r)
        if k in first:
            exact.append({"source": r.source, "duplicate_of": first[k]})
        else:
            first[k] = r.source
    near = []
    if recs:
        for r, hit in zip(recs, near_duplicates([r.all_text() for r in recs], near_threshold)):
            other = recs[hit[0]] if hit is not None else None
            if other is not None and other.all_text() != r.all_text() and other.value == r.value:
                near.append({"source": r.source, "duplicate_of": recs[hit[0]].source, "similarity": round(hit[1], 3)})
    groups: dict[str, list] = defaultdict(list)
    for r in recs:
        if r.kind == "classify":
            groups[conflict_key(r)].append(r)
    conflicts = [[f"{r.source}={r.label}" for r in g] for g in groups.values() if len({r.label for r in g}) > 1]
    rep["duplicates"] = {"exact": len(exact), "near": len(near), "near_threshold": near_threshold,
                         "exact_examples": exact[:EXAMPLES], "near_examples": near[:EXAMPLES]}
    rep["conflicting_labels"] = {"count": len(conflicts), "examples": conflicts[:EXAMPLES]}

    # PII
    pii_kinds: Counter = Counter()
    pii_records: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        c = count_pii(r.all_text())
        pii_kinds.update(c)
        for k in c:
            pii_records[k].append(r.source)
    rep["pii"] = {"hits": dict(pii_kinds.most_common()),
                  "records": {k: len(v) for k, v in pii_records.items()},
                  "examples": {k: v[:EXAMPLES] for k, v in pii_records.items()}}

    # protected-attribute terms by label
    by_label: dict[str, Counter] = defaultdict(Counter)
    per_label_n: Counter = Counter()
    for r in recs:
        lab = r.label if r.label is not None else "(all)"
        per_label_n[lab] += 1
        by_label[lab].update(categories_in(r.all_text()))
    bias = {"categories": list(BIAS_TERMS), "records_per_label": dict(per_label_n),
            "mentions": {lab: {c: by_label[lab][c] for c in BIAS_TERMS} for lab in per_label_n},
            "rates": {lab: {c: round(by_label[lab][c] / per_label_n[lab], 4) for c in BIAS_TERMS}
                      for lab in per_label_n},
            "skewed": []}
    if len(per_label_n) > 1:
        for c in BIAS_TERMS:
            rates = {lab: by_label[lab][c] / per_label_n[lab] for lab in per_label_n}
            hi, lo = max(rates, key=rates.get), min(rates, key=rates.get)
            if by_label[hi][c] >= BIAS_MIN_MENTIONS and rates[hi] >= BIAS_RATIO * max(rates[lo], 1e-9):
                bias["skewed"].append({"category": c, "label_high": hi, "rate_high": round(rates[hi], 4),
                                       "label_low": lo, "rate_low": round(rates[lo], 4)})
    rep["bias"] = bias

    rep["fix_first"] = fix_first(rep)
    rep["_lengths"] = lengths  # for the plots; not written to report.json
    return rep


def fix_first(rep: dict[str, Any]) -> list[str]:
    """What to fix, most harmful first: unusable records, contradictions, leaks of private data, then
    repetition, then size, balance and skew."""
    todo = []
    c = rep["counts"]
    if c["unusable"]:
        todo.append(f"fix or drop {c['unusable']} unusable records (see problems; `tuneloop data check`)")
    if rep["conflicting_labels"]["count"]:
        todo.append(f"resolve {rep['conflicting_labels']['count']} texts that carry conflicting labels")
    if rep["pii"]["hits"]:
        kinds = ", ".join(f"{n} {k}" for k, n in rep["pii"]["hits"].items())
        todo.append(f"scrub personal data ({kinds}): `tuneloop data clean --pii scrub`")
    d = rep["duplicates"]
    if d["exact"] or d["near"]:
        todo.append(f"drop {d['exact']} exact and {d['near']} near duplicates: `tuneloop data clean`")
    over = rep.get("tokens", {}).get("over_max")
    if over and over["count"]:
        todo.append(f"{over['count']} records are longer than {over['max_tokens']} tokens; they will be truncated")
    if rep.get("long_inputs", {}).get("most_cut"):
        todo.append(" ".join(line.strip() for line in long_input_lines(rep["long_inputs"])[1:]))
    todo.extend(rep["size_warnings"])
    for s in rep["bias"]["skewed"]:
        todo.append(f"{s['category']} terms appear in {s['rate_high']:.1%} of {s['label_high']!r} records but "
                    f"{s['rate_low']:.1%} of {s['label_low']!r}: check the model does not learn the shortcut")
    if not todo:
        todo.append("nothing urgent: the data is clean, balanced and large enough by these checks")
    return todo


# ----------------------------------------------------------------------------------------------------
# plots and HTML


def _png(fig) -> str:
    return base64.b64encode(figure_png(fig, dpi=100, bbox_inches="tight")).decode()


def plots(rep: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    if rep.get("labels"):
        fig, ax = plt.subplots(figsize=(6, 3))
        labs = list(rep["labels"])
        ax.bar(labs, [rep["labels"][x] for x in labs], color="#4c72b0")
        ax.axhline(MIN_PER_CLASS, color="#c44e52", ls="--", label=f"{MIN_PER_CLASS} per class")
        ax.set_ylabel("records")
        ax.set_title("Label balance")
        ax.legend()
        out["labels"] = _png(fig)
    if rep.get("_values"):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(rep["_values"], bins=40, color="#8172b3")
        ax.set_xlabel("target value")
        ax.set_ylabel("records")
        ax.set_title("Target values")
        out["values"] = _png(fig)
    if rep["_lengths"]:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(rep["_lengths"], bins=40, color="#55a868")
        ax.set_xlabel(f"tokens ({rep['tokens']['model']})")
        ax.set_ylabel("records")
        ax.set_title("Token lengths")
        out["tokens"] = _png(fig)
    b = rep["bias"]
    if any(any(v.values()) for v in b["mentions"].values()):
        fig, ax = plt.subplots(figsize=(7, 3))
        labs = list(b["rates"])
        width = 0.8 / max(1, len(labs))
        for i, lab in enumerate(labs):
            ax.bar([j + i * width for j in range(len(b["categories"]))],
                   [100 * b["rates"][lab][c] for c in b["categories"]], width, label=str(lab))
        ax.set_xticks([j + width * (len(labs) - 1) / 2 for j in range(len(b["categories"]))])
        ax.set_xticklabels(b["categories"])
        ax.set_ylabel("% of records mentioning")
        ax.set_title("Protected-attribute terms by label")
        ax.legend()
        out["bias"] = _png(fig)
    if rep["pii"]["hits"]:
        fig, ax = plt.subplots(figsize=(5, 2.5))
        ks = list(rep["pii"]["hits"])
        ax.barh(ks, [rep["pii"]["hits"][k] for k in ks], color="#dd8452")
        ax.set_xlabel("hits")
        ax.set_title("PII by kind")
        out["pii"] = _png(fig)
    return out


def _table(rows: list[tuple], head: tuple) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def render_html(rep: dict[str, Any], images: dict[str, str]) -> str:
    e = html.escape
    c = rep["counts"]
    parts = [f"<h1>Data report: {e(str(rep['file']))}</h1>",
             f"<p>format <b>{e(str(rep['format']))}</b> · shape <b>{e(str(rep['shape']))}</b> · task "
             f"<b>{e(str(rep['task']))}</b> · {c['rows']} rows, {c['usable']} usable, {c['unusable']} unusable, "
             f"{c['augmented']} augmented</p>",
             "<h2>Fix first</h2><ol>" + "".join(f"<li>{e(t)}</li>" for t in rep["fix_first"]) + "</ol>"]
    if "labels" in images:
        parts.append("<h2>Labels</h2>" + _table(list(rep["labels"].items()), ("label", "records")))
        parts.append(f'<img alt="label balance" src="data:image/png;base64,{images["labels"]}">')
    if "values" in rep:
        parts.append("<h2>Target values</h2>" + _table(list(rep["values"].items()), ("statistic", "value")))
        parts.append(f'<img alt="target values" src="data:image/png;base64,{images["values"]}">')
    if "tokens" in rep:
        t = {k: v for k, v in rep["tokens"].items() if k != "over_max"}
        parts.append("<h2>Token lengths</h2>" + _table(list(t.items()), ("statistic", "tokens")))
        parts.append(f'<img alt="token lengths" src="data:image/png;base64,{images["tokens"]}">')
    d = rep["duplicates"]
    parts.append(f"<h2>Duplicates</h2><p>{d['exact']} exact, {d['near']} near (MinHash Jaccard ≥ "
                 f"{d['near_threshold']}); {rep['conflicting_labels']['count']} texts with conflicting labels</p>")
    if d["exact_examples"] or d["near_examples"]:
        rows = [(x["source"], x["duplicate_of"], x.get("similarity", 1.0)) for x in d["exact_examples"] + d["near_examples"]]
        parts.append(_table(rows, ("record", "duplicate of", "similarity")))
    parts.append("<h2>Personal data</h2>")
    if rep["pii"]["hits"]:
        parts.append(_table([(k, n, rep["pii"]["records"][k], ", ".join(rep["pii"]["examples"][k][:3]))
                             for k, n in rep["pii"]["hits"].items()], ("kind", "hits", "records", "e.g.")))
        parts.append(f'<img alt="pii" src="data:image/png;base64,{images["pii"]}">')
    else:
        parts.append("<p>none found</p>")
    b = rep["bias"]
    parts.append("<h2>Protected-attribute terms by label</h2><p>Share of records mentioning a term of each "
                 "category (word lists in <code>tuneloop/data/bias_terms.py</code>).</p>")
    parts.append(_table([(lab, *[f"{100 * b['rates'][lab][c]:.1f}%" for c in b["categories"]])
                         for lab in b["rates"]], ("label", *b["categories"])))
    if "bias" in images:
        parts.append(f'<img alt="bias terms" src="data:image/png;base64,{images["bias"]}">')
    if rep["problems"]:
        parts.append("<h2>Unusable records</h2><pre>" + e("\n".join(rep["problems"][:100])) + "</pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}"
             "img{display:block;margin:.5em 0;max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tuneloop data report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(out_dir: str, rep: dict[str, Any]) -> None:
    from pathlib import Path

    from ..fileio import write_json_atomic, write_text_atomic

    images = plots(rep)
    data = {k: v for k, v in rep.items() if not k.startswith("_")}
    write_json_atomic(Path(out_dir) / "report.json", data)
    write_text_atomic(Path(out_dir) / "report.html", render_html(rep, images))
