"""Intervals and paired tests: one implementation for every evaluation report and for the gate.

Every metric here is a function of per-example columns (`Metric`): accuracy is the mean of a 0/1 column,
macro-F1 a function of per-label TP/FP/FN means, RMSE the root of a mean square, perplexity the exp of
summed NLL over summed tokens. So one bootstrap fits all of them: resample examples (scipy.stats.bootstrap,
`paired=True` so a resample draws the same examples for every column and for both systems of a pair) and
recompute the metric from the resampled column means.

    metric_interval(columns, metric)          95% interval of one system's metric (BCa, percentile fallback)
    paired_test(metric, a, b)                 a vs b on the same examples: delta (a - b), its interval, p-value
                                              (McNemar's exact binomial test for accuracy, a paired bootstrap
                                              test for the rest)
    paired_interval(metric, cand, prod, ...)  the gate's one-sided bounds of the improvement (better > 0)
    mcnemar(a_correct, b_correct)             McNemar's test (exact binomial below `exact_below` discordant pairs)
    report_statistics(report, pairs)          `intervals` and `tests` for a report dict (eval/schema.py)

Corpus BLEU is not a function of per-example means and gets no interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Metric:
    """A metric as a function of per-example columns: `columns(prediction, reference, labels)` gives each
    example's numbers, `combine(means)` turns their (weighted) means into the metric. Every metric the
    gate knows is a function of column means, so a bootstrap resample is one matrix product."""

    direction: str  # "higher" or "lower" is better
    columns: Callable[[dict, Any, list[str]], list[float]]
    combine: Callable[[np.ndarray], np.ndarray] = lambda m: m[..., 0]
    per_group: bool = True  # meaningful on a class's or slice's examples alone
    test: str = "bootstrap"  # the paired test: "mcnemar" (0/1 correctness) or "bootstrap"


def _f1_columns(p: dict, ref: Any, labels: list[str]) -> list[float]:
    cols = []
    for lab in labels:
        cols += [float(p["label"] == lab and ref == lab), float(p["label"] == lab and ref != lab),
                 float(p["label"] != lab and ref == lab)]
    return cols


def _macro_f1(m: np.ndarray) -> np.ndarray:
    tp, fp, fn = m[..., 0::3], m[..., 1::3], m[..., 2::3]
    den = 2 * tp + fp + fn
    # a label never predicted nor present scores 0, as sklearn's zero_division=0 does in the report
    f1 = np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)
    return f1.mean(-1)


def _perplexity_columns(p: dict, ref: Any, labels: list[str]) -> list[float]:
    # the report's perplexity is exp(summed NLL / summed answer tokens): a ratio of two means
    return [float(p["loss"]) * float(p["tokens"]), float(p["tokens"])]


def _perplexity(m: np.ndarray) -> np.ndarray:
    return np.exp(np.divide(m[..., 0], m[..., 1], out=np.zeros_like(m[..., 0]), where=m[..., 1] > 0))


METRICS: dict[str, dict[str, Metric]] = {
    "classify": {
        "accuracy": Metric("higher", lambda p, ref, labels: [float(bool(p["correct"]))], test="mcnemar"),
        "macro_f1": Metric("higher", _f1_columns, _macro_f1, per_group=False),
    },
    "regress": {
        "mae": Metric("lower", lambda p, ref, labels: [float(p["abs_error"])]),
        "rmse": Metric("lower", lambda p, ref, labels: [(float(p["value"]) - float(ref)) ** 2],
                       lambda m: np.sqrt(m[..., 0])),
    },
    "sft": {
        "rougeL": Metric("higher", lambda p, ref, labels: [float(p["rougeL"])]),
        "loss": Metric("lower", lambda p, ref, labels: [float(p["loss"])]),
    },
}
# per class / slice when the gate metric has no meaning on a subset (macro-F1 of one class's examples)
GROUP_FALLBACK = {"classify": "accuracy"}
# what the reports give an interval beyond the gate's metrics
REPORT_METRICS: dict[str, dict[str, Metric]] = {
    **METRICS, "sft": {**METRICS["sft"], "perplexity": Metric("lower", _perplexity_columns, _perplexity,
                                                              per_group=False),
                       "rouge1": Metric("higher", lambda p, ref, labels: [float(p["rouge1"])]),
                       "rouge2": Metric("higher", lambda p, ref, labels: [float(p["rouge2"])])}}


def metric_for(task: str, name: str) -> Metric:
    if task not in METRICS:
        raise ConfigError(f"gate: task {task!r} has no gate metrics (known tasks: {', '.join(METRICS)})")
    if name not in METRICS[task]:
        raise ConfigError(f"gate.metric: {name!r} is not a {task} metric (known: {', '.join(METRICS[task])})")
    return METRICS[task][name]


# ----------------------------------------------------------------------------------------------------
# the bootstrap


def _as_columns(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def _rng(rng: "np.random.Generator | int | None") -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _bootstrap(columns: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], *, samples: int,
               rng: np.random.Generator, confidence: float = CONFIDENCE, method: str = "percentile"):
    """scipy.stats.bootstrap over the examples (rows), every column resampled with the same draw;
    `statistic` maps column means (..., k) to the metric (...)."""
    from scipy.stats import bootstrap

    def stat(*cols, axis=-1):
        return statistic(np.stack([c.mean(axis=axis) for c in cols], axis=-1))

    data = tuple(columns[:, j] for j in range(columns.shape[1]))
    # batches bound memory (resamples x examples per column) on large test sets
    batch = max(1, min(samples, 4_000_000 // max(1, columns.shape[0] * columns.shape[1])))
    with warnings.catch_warnings():
        # degenerate data (every example alike) is handled by the callers; scipy warns about BCa on it
        warnings.simplefilter("ignore")
        return bootstrap(data, stat, n_resamples=samples, paired=True, vectorized=True, axis=0, batch=batch,
                         confidence_level=confidence, method=method, rng=rng)


def metric_interval(columns, metric: Metric, *, confidence: float = CONFIDENCE, samples: int = RESAMPLES,
                    rng: "np.random.Generator | int | None" = 0) -> tuple[float, float]:
    """Two-sided bootstrap interval of `metric` from per-example `columns` ((n,) or (n, k), as
    `Metric.columns` makes them): BCa, or the percentile interval where BCa is undefined (too few or
    identical examples). A single example, or examples all alike, give the point value twice."""
    cols = _as_columns(columns)
    point = float(metric.combine(cols.mean(0)))
    if len(cols) < 2 or np.all(cols == cols[0]):
        return point, point
    rng = _rng(rng)
    res = _bootstrap(cols, metric.combine, samples=samples, rng=rng, confidence=confidence, method="BCa")
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        res = _bootstrap(cols, metric.combine, samples=samples, rng=rng, confidence=confidence)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    # BCa of a skewed metric can sit just beside a point at the edge of its range (accuracy 1.0)
    return min(lo, point), max(hi, point)


def bootstrap_interval(data: tuple[np.ndarray, ...], statistic: Callable, confidence: float = 0.95,
                       resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of `statistic(*data, axis=-1)` with the arrays resampled together
    (paired: index i of every array is one example), by scipy.stats.bootstrap; None below two examples.
    For statistics that are not a report metric (a slice's gap, a probe's change rate, a perplexity ratio);
    a metric's own interval is `metric_interval`."""
    from scipy.stats import bootstrap

    if len(data[0]) < 2:
        return None
    import warnings

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a slice where every example agrees has a degenerate, still valid, interval
        res = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if np.isnan(lo) or np.isnan(hi) else [lo, hi]


def _delta_distribution(metric: Metric, a: np.ndarray, b: np.ndarray, samples: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution of metric(a) - metric(b), both scored on the same resampled examples."""
    k = a.shape[1]
    if np.array_equal(a, b):
        return np.zeros(samples)
    res = _bootstrap(np.hstack([a, b]), lambda m: metric.combine(m[..., :k]) - metric.combine(m[..., k:]),
                     samples=samples, rng=rng)
    return np.asarray(res.bootstrap_distribution, dtype=np.float64)


def paired_interval(metric: Metric, cand: np.ndarray, prod: np.ndarray, *, confidence: float, samples: int,
                    rng: np.random.Generator) -> dict:
    """Point values, the improvement (better positive) and its one-sided lower bound (and the upper bound at
    the same confidence, for the plot), from a paired percentile bootstrap: each resample draws examples,
    and both systems are scored on the same draw."""
    cand, prod = _as_columns(cand), _as_columns(prod)
    n = len(cand)
    sign = 1.0 if metric.direction == "higher" else -1.0
    c = float(metric.combine(cand.mean(0)))
    p = float(metric.combine(prod.mean(0)))
    deltas = sign * _delta_distribution(metric, cand, prod, samples, rng)
    return {"n": n, "candidate": c, "production": p, "delta": sign * (c - p),
            "lower": float(np.quantile(deltas, 1 - confidence)), "upper": float(np.quantile(deltas, confidence))}


def mcnemar(cand_correct: np.ndarray, prod_correct: np.ndarray, exact_below: int | None = 25) -> dict:
    """McNemar's test of the paired accuracy difference (as statsmodels' `mcnemar`): `b` examples only the
    candidate gets right, `c` only production; exact binomial (two-sided) when b + c < exact_below (always
    when exact_below is None), else chi-square with continuity correction."""
    from scipy.stats import binomtest, chi2

    cand_correct, prod_correct = np.asarray(cand_correct, bool), np.asarray(prod_correct, bool)
    b = int(np.sum(cand_correct & ~prod_correct))
    c = int(np.sum(~cand_correct & prod_correct))
    if b + c == 0:
        return {"b": b, "c": c, "exact": True, "statistic": 0.0, "pvalue": 1.0}
    if exact_below is None or b + c < exact_below:
        return {"b": b, "c": c, "exact": True, "statistic": float(min(b, c)),
                "pvalue": float(binomtest(min(b, c), b + c, 0.5).pvalue)}
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "exact": False, "statistic": float(stat), "pvalue": float(chi2.sf(stat, 1))}


def paired_test(metric: Metric, a, b, *, confidence: float = CONFIDENCE, samples: int = RESAMPLES,
                rng: "np.random.Generator | int | None" = 0) -> dict:
    """System `a` against system `b` on the same examples (row i of each is example i).
    Returns {"test", "p_value" (two-sided), "delta" (metric(a) - metric(b)), "interval" (of delta),
    "n", "a_value", "b_value"}; McNemar adds "discordant": [only a right, only b right].
    The bootstrap test's p-value is that of the resampled deltas centred on zero (the null of no
    difference): the share at least as far from the observed delta as the observed delta is from 0."""
    a, b = _as_columns(a), _as_columns(b)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: {a.shape} vs {b.shape}: the systems must be scored on the same examples")
    rng = _rng(rng)
    av, bv = float(metric.combine(a.mean(0))), float(metric.combine(b.mean(0)))
    delta = av - bv
    dist = _delta_distribution(metric, a, b, samples, rng)
    tail = (1 - confidence) / 2
    out = {"n": len(a), "a_value": av, "b_value": bv, "delta": delta,
           "interval": [float(np.quantile(dist, tail)), float(np.quantile(dist, 1 - tail))]}
    if metric.test == "mcnemar":
        mc = mcnemar(a[:, 0] > 0.5, b[:, 0] > 0.5, exact_below=None)
        out.update(test="mcnemar_exact", p_value=mc["pvalue"], discordant=[mc["b"], mc["c"]])
    else:
        extreme = np.sum(np.abs(dist - delta) >= abs(delta) - 1e-12) if delta != 0 else len(dist)
        out.update(test="paired_bootstrap", p_value=float(min(1.0, (1 + extreme) / (1 + len(dist)))))
    return out


# ----------------------------------------------------------------------------------------------------
# a report's intervals and tests


def _columns(metric: Metric, preds: list[dict], refs: list, labels: list[str]) -> np.ndarray | None:
    """Per-example columns, or None when the predictions lack what the metric needs (an older report,
    a system without per-token losses)."""
    try:
        return np.array([metric.columns(p, r, labels) for p, r in zip(preds, refs)], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None


def default_pairs(systems: list[str], first: str = "tuned", skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """`first` against each other system (tuned vs base, tuned vs each baseline)."""
    if first not in systems:
        return []
    return [(first, s) for s in systems if s != first and s not in skip]


def report_statistics(report: dict, pairs: list[tuple[str, str]] | None = None, *,
                      confidence: float = CONFIDENCE, samples: int = RESAMPLES, seed: int = 0) -> dict:
    """`intervals` ({system: {metric: [lo, hi]}}, each on the examples that system predicted) and `tests`
    (one per pair and metric, on the examples both predicted) for a report dict with `task`, `examples`,
    `predictions` and `labels`; pairs default to tuned against every other system."""
    task = report["task"]
    metrics = REPORT_METRICS.get(task, {})
    labels = list(report.get("labels") or [])
    examples = report["examples"]
    preds = report.get("predictions") or {}
    rng = np.random.default_rng(seed)
    intervals: dict[str, dict[str, list[float]]] = {}
    for system, by_id in preds.items():
        have = [e for e in examples if by_id.get(e["id"]) is not None]
        if not have:
            continue
        for name, m in metrics.items():
            cols = _columns(m, [by_id[e["id"]] for e in have], [e["reference"] for e in have], labels)
            if cols is not None:
                lo, hi = metric_interval(cols, m, confidence=confidence, samples=samples, rng=rng)
                intervals.setdefault(system, {})[name] = [lo, hi]
    tests = []
    for a, b in pairs if pairs is not None else default_pairs(list(preds)):
        pa, pb = preds.get(a) or {}, preds.get(b) or {}
        both = [e for e in examples if pa.get(e["id"]) is not None and pb.get(e["id"]) is not None]
        if not both:
            continue
        refs = [e["reference"] for e in both]
        for name, m in metrics.items():
            ca = _columns(m, [pa[e["id"]] for e in both], refs, labels)
            cb = _columns(m, [pb[e["id"]] for e in both], refs, labels)
            if ca is None or cb is None:
                continue
            t = paired_test(m, ca, cb, confidence=confidence, samples=samples, rng=rng)
            better = a if (t["delta"] > 0) == (m.direction == "higher") else b
            tests.append({"a": a, "b": b, "metric": name, "direction": m.direction,
                          "better": better if t["delta"] != 0 else None, **t})
    return {"intervals": intervals, "tests": tests,
            "statistics": {"confidence": confidence, "resamples": samples, "seed": seed,
                           "interval": "bootstrap BCa (percentile where BCa is undefined), scipy.stats.bootstrap",
                           "paired": "McNemar exact binomial (accuracy); paired bootstrap (other metrics)"}}
