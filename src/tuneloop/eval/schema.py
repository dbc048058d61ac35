"""The one report schema every task's evaluation writes (`report.json`).

Two runs of one task evaluated on one test set can be compared example by example: every example has a
stable id (its index in the test set and a hash of its input), and every system has a prediction for
every example (None where a system made none, e.g. the seasonal baseline on a day without history).
What one prediction holds, per task:

    classify  {"label", "probability" (of that label), "correct"}
    regress   {"value", "abs_error"}
    sft       {"text", "rougeL", "loss" (mean NLL per answer token, where computed), "tokens" (answer tokens)}

Fields added since format 1 all have defaults, so older reports still load: `intervals`, `tests`,
`statistics` (eval/stats.py), `calibration` (classifiers), `cost` (speed and money per system), `cache`
(which systems were read from the eval cache).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..fileio import write_json_atomic
from ..runs import REPORT_JSON

FORMAT_VERSION = 1


class Headline(BaseModel):
    """The one number a report leads with, per system."""

    model_config = ConfigDict(extra="forbid")
    metric: str
    direction: Literal["higher", "lower"] = Field(description="Which way is better.")
    values: dict[str, float | None]


class TestSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None
    n: int
    fingerprint: str | None


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="`<index>-<key>`: stable across runs on the same test set.")
    index: int
    key: str = Field(description="Hash of the example's input.")
    reference: Any = Field(description="The gold label, value or answer.")
    meta: dict[str, Any] = Field(default_factory=dict, description="What identifies it to a person (a date ...).")


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    task: str
    title: str
    run: str
    model: str
    systems: dict[str, dict[str, Any]] = Field(description="system → its metrics")
    headline: Headline
    test: TestSet
    examples: list[Example]
    predictions: dict[str, dict[str, dict[str, Any] | None]] = Field(
        description="system → example id → prediction (None: the system made none for it)")
    labels: list[str] | None = None
    target: str | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="The run's training metrics.")
    settings: dict[str, Any] = Field(default_factory=dict, description="How the systems were run (decoding ...).")
    notes: list[str] = Field(default_factory=list)
    wall_seconds: float = 0.0
    budget: dict[str, Any] = Field(
        default_factory=dict, description="Under a wall-time budget (the quickstart's --budget): {total_s, "
        "eval_estimate_s, forward_tokens_per_s, train_budget_s, train (the run's budget plan: decision, kept, "
        "rows_total, steps, steps_asked, stopped_at_budget ...), wall_s}.")
    intervals: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict, description="system → metric → [low, high]: its 95% bootstrap interval, on the "
        "examples that system predicted (a sampled system's is wider).")
    tests: list[dict[str, Any]] = Field(
        default_factory=list, description="Paired tests, one per pair of systems and metric: {a, b, metric, "
        "direction, n (shared examples), a_value, b_value, delta (a - b), interval (of delta), test "
        "(mcnemar_exact | paired_bootstrap), p_value, better (a, b or None when equal), discordant (McNemar)}.")
    statistics: dict[str, Any] = Field(default_factory=dict, description="How intervals and tests were made.")
    calibration: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="system → {ece, bins (reliability diagram), coverage (coverage vs "
        "accuracy when abstaining below each confidence), abstain (at eval.abstain_below)} (classifiers).")
    cost: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="system → {records_per_second, p50_ms, p95_ms (latency of a record: "
        "its batch's time), batch_size, cost_per_1000 (at price_per_hour), business_cost_per_1000 "
        "(from eval.error_costs)}.")
    slices: dict[str, Any] = Field(
        default_factory=dict, description="Metrics per slice (length, protected-attribute mention, declared "
        "fields) per system, gaps with intervals, the worst slice (eval/slices.py).")
    probes: dict[str, Any] = Field(
        default_factory=dict, description="Counterfactual bias probes of the tuned system: change rates per "
        "category, sample sizes, flags (eval/probes.py).")
    forgetting: dict[str, Any] = Field(
        default_factory=dict, description="General ability, base vs tuned: perplexity on general text, general "
        "questions, the deltas and a flag (eval/forgetting.py).")
    cache: dict[str, Any] = Field(
        default_factory=dict, description="The eval cache (eval/cache.py): {dir, enabled, systems: {system: "
        "{cached}}}: which systems' predictions were read back instead of recomputed (their speed and cost are "
        "those measured when they were computed); each such system's metrics also say `cached: true`.")


def example_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def make_examples(inputs: list[str], references: list[Any], meta: list[dict] | None = None) -> list[Example]:
    """Examples in test-set order, each keyed by its index and a hash of its input."""
    out = []
    for i, (x, ref) in enumerate(zip(inputs, references)):
        k = example_key(x)
        out.append(Example(id=f"{i}-{k}", index=i, key=k, reference=ref, meta=meta[i] if meta else {}))
    return out


def keyed(examples: list[Example], preds: list[dict | None]) -> dict[str, dict | None]:
    """Per-example predictions (in test-set order) keyed by example id."""
    if len(preds) != len(examples):
        raise ValueError(f"{len(preds)} predictions for {len(examples)} examples")
    return {e.id: p for e, p in zip(examples, preds)}


def headline(systems: dict[str, dict], metric: str, direction: str) -> Headline:
    return Headline(metric=metric, direction=direction, values={n: m.get(metric) for n, m in systems.items()})


def write_report_json(report: Report, out_dir: Path) -> Path:
    return write_json_atomic(Path(out_dir) / REPORT_JSON, report.model_dump(mode="json"))
