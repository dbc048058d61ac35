"""Metrics per slice of the test set, from the per-example predictions a report already holds (no model
calls): by input length (quantile buckets of characters), by protected-attribute mention (the data studio's
categories, through the probe word lists: eval/data/probe_terms.yaml) and by any field the recipe declares
(`eval.slices: [product, region]`, read from each test record's extra keys). For every system, each slice's
value of the task's headline metric (classify accuracy, with macro-F1 beside it; regress MAE; sft ROUGE-L),
its gap to the whole test set with a 95% bootstrap interval, and the worst slice named.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from .stats import bootstrap_interval

SLICE_METRIC: dict[str, tuple[str, str]] = {"classify": ("accuracy", "higher"), "regress": ("mae", "lower"),
                                            "sft": ("rougeL", "higher")}
TOP_VALUES = 12  # a declared field with more distinct values keeps its most common, the rest are "(other)"
NO_MENTION = "(none)"


def example_value(task: str, pred: dict) -> float:
    """One example's contribution to the slice metric (its mean over a slice is the metric)."""
    if task == "classify":
        return float(bool(pred["correct"]))
    if task == "regress":
        return float(pred["abs_error"])
    return float(pred["rougeL"])


def length_slices(texts: list[str], buckets: int) -> dict[str, list[int]]:
    """Quantile buckets of input length in characters, labelled by their range."""
    n = np.array([len(t) for t in texts])
    if not len(n) or buckets < 2:
        return {}
    edges = np.unique(np.quantile(n, np.linspace(0, 1, buckets + 1)[1:-1]).round().astype(int))
    which = np.searchsorted(edges, n, side="right")
    out: dict[str, list[int]] = {}
    for b in range(len(edges) + 1):
        idx = np.flatnonzero(which == b).tolist()
        if idx:
            out[f"{n[idx].min()}-{n[idx].max()} chars"] = idx
    return out


def mention_slices(texts: list[str], lexicon=None) -> dict[str, list[int]]:
    from .probes import load_lexicon, mentions

    lx = lexicon or load_lexicon()
    out: dict[str, list[int]] = {c: [] for c in lx.categories}
    out[NO_MENTION] = []
    for i, t in enumerate(texts):
        cats = mentions(t, lx)
        for c in cats:
            out[c].append(i)
        if not cats:
            out[NO_MENTION].append(i)
    return {k: v for k, v in out.items() if v}


def field_slices(meta: list[dict], field: str) -> dict[str, list[int]]:
    vals = ["(missing)" if m.get(field) in (None, "") else str(m.get(field)) for m in meta]
    counts: dict[str, int] = {}
    for v in vals:
        counts[v] = counts.get(v, 0) + 1
    keep = set(sorted(counts, key=lambda v: (-counts[v], v))[:TOP_VALUES])
    out: dict[str, list[int]] = {}
    for i, v in enumerate(vals):
        out.setdefault(v if v in keep else "(other)", []).append(i)
    return dict(sorted(out.items()))


def _macro_f1(preds: list[str], refs: list[str], labels: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0))


def slice_report(task: str, examples: list[dict], predictions: dict[str, dict[str, dict | None]],
                 texts: list[str], *, meta: list[dict] | None = None, fields: list[str] | None = None,
                 labels: list[str] | None = None, buckets: int = 4, min_size: int = 10, confidence: float = 0.95,
                 seed: int = 0, lexicon=None) -> dict:
    """The report's `slices` section. `texts`: each example's input (its length and mentions are read);
    `meta`: each example's declared fields (`fields` names which)."""
    metric, direction = SLICE_METRIC[task]
    groups: dict[str, dict[str, list[int]]] = {"length": length_slices(texts, buckets),
                                               "mention": mention_slices(texts, lexicon)}
    for f in fields or []:
        groups[f"field:{f}"] = field_slices(meta or [{} for _ in texts], f)
    out: dict[str, Any] = {"metric": metric, "direction": direction, "min_size": min_size, "confidence": confidence,
                           "length_unit": "characters", "buckets": buckets, "fields": list(fields or []),
                           "systems": {}}
    sign = 1.0 if direction == "higher" else -1.0
    for system, by_id in predictions.items():
        have = [i for i, e in enumerate(examples) if by_id.get(e["id"]) is not None]
        if not have:
            continue
        pos = {i: k for k, i in enumerate(have)}
        preds = [by_id[examples[i]["id"]] for i in have]
        v = np.array([example_value(task, p) for p in preds])
        overall = float(v.mean())
        rows = []
        for by, slices in groups.items():
            for name, idx in slices.items():
                mask = np.zeros(len(have))
                mask[[pos[i] for i in idx if i in pos]] = 1.0
                k = int(mask.sum())
                if not k:
                    continue
                value = float(v[mask > 0].mean())
                row: dict[str, Any] = {"by": by, "slice": name, "n": k, "value": value, "gap": value - overall,
                                       "interval": None}
                if k < len(have):
                    row["interval"] = bootstrap_interval(
                        (v, mask), lambda x, m, axis=-1: (x * m).sum(axis) / m.sum(axis) - x.mean(axis),
                        confidence, seed=seed)
                else:
                    row["interval"] = [0.0, 0.0]
                if task == "classify" and labels:
                    sel = [j for j in range(len(have)) if mask[j]]
                    got = [preds[j]["label"] for j in sel]
                    ref = [examples[have[j]]["reference"] for j in sel]
                    row["macro_f1"] = _macro_f1(got, ref, labels)
                    row["macro_f1_gap"] = row["macro_f1"] - _macro_f1(
                        [p["label"] for p in preds], [examples[i]["reference"] for i in have], labels)
                rows.append(row)
        eligible = [r for r in rows if r["n"] >= min_size and r["n"] < len(have)]
        worst = min(eligible, key=lambda r: sign * r["gap"]) if eligible else None
        out["systems"][system] = {"n": len(have), "overall": overall, "slices": rows,
                                  "worst": None if worst is None else {k: worst[k] for k in
                                                                       ("by", "slice", "n", "value", "gap", "interval")}}
    return out


# ----------------------------------------------------------------------------------------------------
# HTML


def slices_png(section: dict, system: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import figure_png

    rows = section["systems"][system]["slices"]
    fig, ax = plt.subplots(figsize=(6.4, 0.28 * len(rows) + 1.2), dpi=110)
    y = np.arange(len(rows))[::-1]
    gaps = [r["gap"] for r in rows]
    lo = [r["gap"] - r["interval"][0] if r["interval"] else 0 for r in rows]
    hi = [r["interval"][1] - r["gap"] if r["interval"] else 0 for r in rows]
    worse = [(g < 0) == (section["direction"] == "higher") and g != 0 for g in gaps]
    ax.barh(y, gaps, xerr=[lo, hi], color=["#c0504d" if w else "#4f81bd" for w in worse], capsize=2)
    ax.set_yticks(y, [f"{r['by'].removeprefix('field:')}: {r['slice']} (n={r['n']})" for r in rows], fontsize=7)
    ax.axvline(0, color="#333", lw=0.8)
    ax.set_xlabel(f"{section['metric']} of the slice minus the whole test set "
                  f"({'higher' if section['direction'] == 'higher' else 'lower'} is better)")
    ax.set_title(f"{system}: slices, {int(section['confidence'] * 100)}% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def _interval_text(iv: list[float] | None) -> str:
    return "-" if not iv else f"{iv[0]:+.4f} … {iv[1]:+.4f}"


def slices_html(report: dict) -> str:
    import base64

    sec = report.get("slices") or {}
    if not sec.get("systems"):
        return ""
    e = html.escape
    parts = [f"<h2>Slices</h2><p class=\"meta\">{e(sec['metric'])} per slice; gap = slice minus the whole test set, "
             f"with a {int(sec['confidence'] * 100)}% bootstrap interval. Worst slice: the worst gap among slices "
             f"of at least {sec['min_size']} examples. Length buckets: {sec['buckets']} quantiles of "
             f"{e(sec['length_unit'])}.</p>"]
    for system, s in sec["systems"].items():
        w = s.get("worst")
        worst = (f"worst: <b>{e(w['by'])} = {e(w['slice'])}</b> (n={w['n']}) {w['value']:.4f}, gap {w['gap']:+.4f}"
                 + f" ({_interval_text(w.get('interval'))})"
                 if w else "no slice large enough to name a worst one")
        rows = "".join(
            f"<tr><th>{e(r['by'])}</th><td>{e(r['slice'])}</td><td>{r['n']}</td><td>{r['value']:.4f}</td>"
            f"<td>{r['gap']:+.4f}</td><td>{_interval_text(r['interval'])}</td></tr>" for r in s["slices"])
        png = base64.b64encode(slices_png(sec, system)).decode()
        parts.append(f"<h3>{e(system)} (overall {s['overall']:.4f}; {worst})</h3>"
                     f"<table><tr><th>by</th><th>slice</th><th>n</th><th>{e(sec['metric'])}</th><th>gap</th>"
                     f"<th>interval</th></tr>{rows}</table>"
                     f'<figure><img alt="slice gaps of {e(system)}" src="data:image/png;base64,{png}"></figure>')
    return "".join(parts)
