"""Speed and money per system: records/s, latency percentiles, the price of 1,000 predictions, and (when the
recipe prices each kind of error) the expected business cost of the mistakes a system makes.

Latency is measured as the evaluation runs, in batches: a record waits for its whole batch, so its latency
is its batch's wall time, and p50 / p95 are taken over records. Serving batches concurrent requests the
same way, so this is the latency of a full batch of `batch_size`, not of a lone request.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from ..errors import ConfigError

# What an hour of compute costs when the recipe gives no `eval.price_per_hour` (USD, on-demand cloud list
# prices, late 2026): a 2-vCPU general-purpose VM, and one mid-range inference GPU (L4 / A10G class).
DEFAULT_PRICE_PER_HOUR = {"cpu": 0.10, "gpu": 1.00}


class BatchTimer:
    """Collects (records, seconds) per batch; `batch(n)` times one."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []

    @contextmanager
    def batch(self, n: int):
        t = time.perf_counter()
        yield
        self.batches.append((n, time.perf_counter() - t))


def latency_summary(batches: list[tuple[int, float]], wall_seconds: float | None = None) -> dict:
    """records/s over the whole run (`wall_seconds`, default the batches' sum) and p50 / p95 of the
    per-record latency (each record's batch time), in milliseconds."""
    n = sum(k for k, _ in batches)
    total = wall_seconds if wall_seconds is not None else sum(s for _, s in batches)
    per_record = np.repeat([s for _, s in batches], [k for k, _ in batches]) if batches else np.array([])
    return {"records": n, "seconds": round(float(total), 4),
            "records_per_second": round(n / total, 2) if total > 0 else None,
            "p50_ms": round(float(np.percentile(per_record, 50)) * 1e3, 2) if n else None,
            "p95_ms": round(float(np.percentile(per_record, 95)) * 1e3, 2) if n else None,
            "batch_size": max((k for k, _ in batches), default=None)}


def price_per_hour(given: float | None, device_type: str) -> tuple[float, str]:
    """The price used and where it came from (the recipe, or the documented default for the device)."""
    if given is not None:
        return float(given), "eval.price_per_hour"
    kind = "cpu" if device_type == "cpu" else "gpu"
    return DEFAULT_PRICE_PER_HOUR[kind], f"default for one {kind.upper()} hour"


def cost_per_1000(records_per_second: float | None, hourly: float) -> float | None:
    """What 1,000 predictions cost at this throughput, with the machine busy the whole time."""
    if not records_per_second:
        return None
    return round(1000 / records_per_second / 3600 * hourly, 6)


def error_cost_matrix(error_costs: dict[str, float], labels: list[str]) -> np.ndarray:
    """(true, predicted) cost of each kind of mistake, from {"true->predicted": cost} or {"label": cost}
    (the cost of missing that label, whatever is said instead); correct answers cost nothing. Names outside
    `labels` fail naming the labels."""
    m = np.zeros((len(labels), len(labels)))
    idx = {l: i for i, l in enumerate(labels)}

    def label(name: str, key: str) -> int:
        if name not in idx:
            raise ConfigError(f"eval.error_costs: {key!r}: {name!r} is not a label (labels: {', '.join(labels)})")
        return idx[name]

    for key, cost in error_costs.items():
        if "->" in key:
            t, p = (s.strip() for s in key.split("->", 1))
            if t == p:
                raise ConfigError(f"eval.error_costs: {key!r}: a correct answer costs nothing")
            m[label(t, key), label(p, key)] = float(cost)
        else:
            i = label(key.strip(), key)
            for j in range(len(labels)):
                if j != i and m[i, j] == 0:
                    m[i, j] = float(cost)
    return m


def business_cost(confusion: list[list[int]], costs: np.ndarray) -> dict:
    """Expected cost of a system's mistakes from its confusion matrix (rows true, columns predicted)."""
    c = np.asarray(confusion, dtype=np.float64)
    n = c.sum()
    total = float((c * costs).sum())
    return {"total": total, "per_1000": round(total / n * 1000, 4) if n else None}


def system_cost(timer: BatchTimer, given_price: float | None, device_type: str, confusion=None,
                costs: np.ndarray | None = None) -> dict:
    """The report's `cost` entry for one system: its speed, latency, price per 1,000 predictions and
    (given an error cost matrix and its confusion matrix) the expected cost of its mistakes."""
    hourly, source = price_per_hour(given_price, device_type)
    out = latency_summary(timer.batches)
    out.update(price_per_hour=hourly, price_source=source, cost_per_1000=cost_per_1000(out["records_per_second"],
                                                                                    hourly))
    if costs is not None and confusion is not None:
        out["business_cost"] = business_cost(confusion, costs)
    return out
