"""Calibration of classifiers: can a confidence be taken at its word?

    contextual_calibration(probs, prior)      divide out the label prior a prompt carries (Zhao et al. 2021,
                                              "Calibrate before use"): `prior` is the mean answer distribution
                                              on content-free inputs ("N/A", "", "[MASK]") in the same prompt
    expected_calibration_error(conf, correct) ECE over equal-width confidence bins, and the bins behind it
                                              (the reliability diagram)
    coverage_curve(conf, correct)             abstain below each confidence: the share kept and its accuracy
    calibration_summary(conf, correct, ...)   the report's `calibration` entry for one system
"""

from __future__ import annotations

import numpy as np

CONTENT_FREE = ("N/A", "", "[MASK]")
BINS = 10


def contextual_calibration(probs, prior) -> np.ndarray:
    """Each row divided by the prior, renormalised: W = diag(prior)^-1 with no bias, as in the paper. A
    model that answers one label whatever the text (a prior near one-hot) is pulled back to what the text
    itself adds."""
    p = np.asarray(probs, dtype=np.float64)
    q = np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None)
    out = p / q
    return out / out.sum(-1, keepdims=True)


def expected_calibration_error(conf, correct, bins: int = BINS) -> tuple[float, list[dict]]:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share
    of examples; with the bins ({low, high, n, confidence, accuracy}) for the reliability diagram."""
    c = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right-closed bins, the first also holds 0: a confidence of exactly 1.0 falls in the top bin
    which = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        acc, cf = float(y[m].mean()), float(c[m].mean())
        ece += m.sum() / max(1, len(c)) * abs(acc - cf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(m.sum()),
                     "confidence": cf, "accuracy": acc})
    return float(ece), rows


def coverage_curve(conf, correct, points: int = 21) -> list[dict]:
    """For thresholds t from 0 to 1: abstain (send to a person) below t; {threshold, coverage (share
    answered), accuracy (on those answered; None when none is)}."""
    c = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    out = []
    for t in np.linspace(0.0, 1.0, points):
        keep = c >= t
        out.append({"threshold": float(t), "coverage": float(keep.mean()) if len(c) else 0.0,
                    "accuracy": float(y[keep].mean()) if keep.any() else None})
    return out


def calibration_summary(conf, correct, abstain_below: float | None = None, bins: int = BINS) -> dict:
    ece, rows = expected_calibration_error(conf, correct, bins)
    out = {"ece": ece, "bins": rows, "coverage": coverage_curve(conf, correct)}
    if abstain_below is not None:
        c, y = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
        keep = c >= abstain_below
        out["abstain"] = {"below": abstain_below, "coverage": float(keep.mean()), "abstained": int((~keep).sum()),
                          "accuracy": float(y[keep].mean()) if keep.any() else None}
    return out


def reliability_png(calibration: dict[str, dict], abstain_below: float | None = None) -> bytes:
    """Reliability diagram (accuracy against confidence per bin; the diagonal is perfect calibration) and
    coverage against accuracy when abstaining, every system on the same two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import figure_png

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=110)
    ax.plot([0, 1], [0, 1], "--", color="#999", lw=0.8)
    for name, c in calibration.items():
        rows = c["bins"]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", ms=3,
                label=f"{name} (ECE {c['ece']:.3f})")
        cov = [p for p in c["coverage"] if p["accuracy"] is not None]
        bx.plot([p["coverage"] for p in cov], [p["accuracy"] for p in cov], "o-", ms=3, label=name)
        if "abstain" in c and c["abstain"]["accuracy"] is not None:
            bx.plot([c["abstain"]["coverage"]], [c["abstain"]["accuracy"]], "k*", ms=9)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="reliability")
    bx.set(xlabel="coverage (share answered)", ylabel="accuracy on those answered",
           title="abstain below a confidence" + (f" (★ at {abstain_below:g})" if abstain_below is not None else ""))
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
