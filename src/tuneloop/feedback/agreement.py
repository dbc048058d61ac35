"""Agreement between reviewers on the items more than one of them reviewed.

Cohen's kappa is scikit-learn's `cohen_kappa_score` (quadratically weighted for ratings, where 4 vs 5 is a
smaller disagreement than 1 vs 5); it takes two raters, so it is computed on the first two reviews of each
item. Krippendorff's alpha takes any number of reviewers per item and missing reviews; it is the short
coincidence-matrix computation below (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"),
checked in tests/test_feedback_store.py against that paper's worked example, rather than a dependency for
twenty lines.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import permutations
from typing import Hashable, Sequence


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], level: str = "nominal") -> float | None:
    """Alpha over `units` (each the values its reviewers gave; a unit with fewer than two is not
    pairable and left out). level: nominal | ordinal | interval. None when it is undefined (no pairable
    unit, or every value the same so no disagreement could be expected)."""
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level {level!r}: known: nominal, ordinal, interval")
    # coincidences o[c, k]: each ordered pair of values within a unit, weighted 1 / (m_u - 1)
    o: Counter = Counter()
    for vals in units:
        m = len(vals)
        if m < 2:
            continue
        for c, k in permutations(vals, 2):
            o[c, k] += 1.0 / (m - 1)
    n_c: Counter = Counter()
    for (c, _), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    if n <= 1 or len(n_c) < 2:
        return None
    values = sorted(n_c)

    def delta2(c, k) -> float:
        if level == "nominal":
            return 0.0 if c == k else 1.0
        if level == "interval":
            return float(c - k) ** 2
        lo, hi = sorted((values.index(c), values.index(k)))
        between = sum(n_c[values[g]] for g in range(lo, hi + 1))
        return (between - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(w * delta2(c, k) for (c, k), w in o.items())
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in values for k in values)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def cohen_kappa(first: list, second: list, weights: str | None = None) -> float | None:
    """scikit-learn's kappa of two raters' labels; None where it is undefined (fewer than two items, or
    both raters always giving the one same value)."""
    from sklearn.metrics import cohen_kappa_score

    if len(first) < 2 or len(set(first) | set(second)) < 2:
        return None
    k = float(cohen_kappa_score(first, second, weights=weights))
    return None if math.isnan(k) else k


def agreement_on(units: list[list], level: str) -> dict:
    """{"items", "agree" (share of items whose first two reviews agree), "cohen_kappa", "krippendorff_alpha"}
    for one kind of mark; `units` holds each item's marks in review order (items with fewer than two
    marks of this kind are left out)."""
    units = [u for u in units if len(u) >= 2]
    first, second = [u[0] for u in units], [u[1] for u in units]
    return {
        "items": len(units),
        "agree": (sum(a == b for a, b in zip(first, second)) / len(units)) if units else None,
        "cohen_kappa": cohen_kappa(first, second, "quadratic" if level == "ordinal" else None),
        "krippendorff_alpha": krippendorff_alpha(units, level),
    }
