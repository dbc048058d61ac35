"""Sizing a run to a wall-time budget (`train.time_budget`).

Before the first step, the recipe's own forward and backward run on a few real batches (chosen across
the length distribution, timed after one warm-up batch; a batch during which torch.compile compiled is run
again and timed then; their gradients are thrown away, no optimizer step is taken). That gives seconds per
padded token on this machine, with this model and method, which prices every planned batch exactly (the length-bucketed batches are known in advance). What does not fit
is cut in the order a user would cut it: epochs first (down to one), then examples, as a seeded choice
stratified by label where the task has labels, so the class shares stay as they were. The plan is
written to the run folder (`budget.json`), so a resumed run follows it instead of measuring again, and
said up front: examples, epochs, steps, ETA.

Why measured and not predicted from FLOPs: the step's speed depends on the attention kernel, the cache of
frozen blocks, the CPU's bf16 support and whatever else runs on the machine; the budget is about this run,
here, now.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import format_seconds as fmt_s
from .common import length_bucketed_batches

PROBE_BATCHES = 3  # timed, after one warm-up batch
VALIDATION_COST = 1 / 3  # a validation token costs a forward pass: about a third of forward + backward
RESERVE = 0.03  # of the budget, kept for saving and the last validation's bookkeeping


@dataclass
class Plan:
    budget_s: float
    seconds_per_token: float  # per padded token of forward + backward, measured
    probe_s: float
    rows_total: int
    rows: list[int] | None  # the rows trained on; None: all of them
    epochs_asked: float
    steps_asked: int
    steps: int
    eta_s: float  # training alone, from the start of the first step
    decision: str  # "fits" | "fewer epochs" | "fewer examples"
    dropped_by_stratum: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.rows_total if self.rows is None else len(self.rows)

    def message(self) -> str:
        head = (f"time budget {fmt_s(self.budget_s)}: measured {1 / self.seconds_per_token:,.0f} tokens/s "
                f"(forward + backward) in {self.probe_s:.1f} s")
        if self.decision == "fits":
            return (f"{head}; everything fits: {self.kept:,} examples, {self.steps:,} steps, "
                    f"ETA {fmt_s(self.eta_s)}")
        if self.decision == "fewer epochs":
            return (f"{head}; {self.steps_asked:,} steps would take longer, so {self.steps:,} steps "
                    f"({self.steps / max(1, self.steps_asked) * self.epochs_asked:.2f} of {self.epochs_asked:g} epochs) "
                    f"on all {self.kept:,} examples, ETA {fmt_s(self.eta_s)}")
        dropped = self.rows_total - self.kept
        by = ", ".join(f"{k} {v:,}" for k, v in self.dropped_by_stratum.items()) if self.dropped_by_stratum else ""
        return (f"{head}; one epoch of all {self.rows_total:,} examples would not fit, so {self.kept:,} of them "
                f"(a seeded sample{', stratified by label' if by else ''}; {dropped:,} left out{': ' + by if by else ''}), "
                f"{self.steps:,} steps, ETA {fmt_s(self.eta_s)}")

    def record(self) -> dict:
        d = asdict(self)
        d["kept"] = self.kept
        d["message"] = self.message()
        return d


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def probe_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """One warm-up and PROBE_BATCHES timed batches, spread over the length distribution (short to long)."""
    batches = sorted(length_bucketed_batches(lengths, batch_size, seed + 7919),
                     key=lambda b: max(lengths[i] for i in b))
    n = min(len(batches), PROBE_BATCHES + 1)
    picks = sorted({round(q * (len(batches) - 1) / max(1, n - 1)) for q in range(n)})
    return [batches[picks[len(picks) // 2]]] + [batches[i] for i in picks]


def measure(model, loss_fn, lengths: list[int], batch_size: int, seed: int, device, autocast: bool,
            world: int = 1, rank: int = 0) -> tuple[float, float]:
    """(seconds per padded token of forward + backward, seconds the probe took) on this process's share
    of a few batches; gradients are cleared afterwards, nothing else changes."""
    t0 = time.perf_counter()
    spent, tokens = 0.0, 0
    # A training step as the loop runs it: training mode (dropout; under train.compile the graph the loop
    # will reuse, where eval mode compiled a second set), its random draws not taken from the run's own.
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for n, b in enumerate(probe_batches(lengths, batch_size, seed)):
            mine = b[rank::world] or b[:1]
            for _ in range(RETIMES + 1):
                compiled = compilations()
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(model, mine, mine)
                loss.backward()
                took = time.perf_counter() - start
                # A batch that compiled (train.compile: a graph for a variant the warm-up did not meet) timed
                # the compiler, not the step: run it again. Seen on a 2-core AVX2 CPU with a cold Inductor
                # cache: the probe measured 76 tokens/s where training then ran at 217, and the budget kept
                # 92 of 4,000 reviews for a run that ended 2 minutes early.
                if compilations() == compiled:
                    break
            if n:  # the first batch warms up allocators and kernels
                spent += took
                tokens += len(mine) * max(lengths[i] for i in mine)
    model.zero_grad(set_to_none=True)
    return spent / max(1, tokens), time.perf_counter() - t0


RETIMES = 2  # a probe batch that compiled is run again, at most this often


def compilations() -> int:
    """How many graphs torch.compile has captured or compiled in this process so far (Dynamo frames, AOT
    autograd graphs, Inductor compilations); 0 where nothing was ever compiled."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without Dynamo: nothing compiles
        return 0
    inductor = counters["inductor"]
    return (counters["frames"]["total"] + counters["aot_autograd"]["total"]
            + inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"])


def stratified_keep(n_rows: int, keep: int, strata: list | None, seed: int) -> tuple[list[int], dict[str, int]]:
    """`keep` of `n_rows` row indices (sorted), each stratum keeping its share (largest remainders);
    also how many each stratum lost."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i in range(n_rows):
        groups.setdefault(str(strata[i]) if strata is not None else "", []).append(i)
    quota = {k: keep * len(v) / n_rows for k, v in groups.items()}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: (-(quota[k] - take[k]), k))[: keep - sum(take.values())]:
        take[k] += 1
    kept: list[int] = []
    for k in sorted(groups):
        rows = groups[k][:]
        rng.shuffle(rows)
        kept.extend(rows[: max(1, take[k]) if groups[k] else 0])
    dropped = {k: len(groups[k]) - min(len(groups[k]), max(1, take[k])) for k in sorted(groups)} if strata is not None else {}
    return sorted(kept), {k: v for k, v in dropped.items() if v}


def steps_cost(lengths: list[int], rows: list[int], batch_size: int, grad_accum: int, seed: int,
               steps: int, sec_per_token: float) -> float:
    """Seconds for `steps` optimizer steps over `rows`, epoch after epoch, priced batch by batch."""
    sub = [lengths[i] for i in rows]
    total, done, epoch = 0.0, 0, 0
    while done < steps * grad_accum:
        batches = length_bucketed_batches(sub, batch_size, seed + epoch)
        for b in batches:
            if done >= steps * grad_accum:
                break
            total += len(b) * max(sub[i] for i in b) * sec_per_token
            done += 1
        epoch += 1
    return total


def plan(budget_s: float, sec_per_token: float, probe_s: float, lengths: list[int], tc, strata: list | None,
         val_tokens: int, n_validations, plan_steps) -> Plan:
    """Fit the run into `budget_s - probe_s` seconds. `plan_steps(n_rows, tc)` is the loop's own step
    plan; `n_validations(total_steps, steps_per_epoch)` how many validations a plan runs."""
    n = len(lengths)
    rows_all = list(range(n))
    _, per_epoch, asked, _ = plan_steps(n, tc)
    left = budget_s * (1 - RESERVE) - probe_s

    def cost(rows, steps) -> float:
        spe = plan_steps(len(rows), tc)[1]
        return (steps_cost(lengths, rows, tc.batch_size, tc.grad_accum, tc.seed, steps, sec_per_token)
                + n_validations(steps, spe) * val_tokens * sec_per_token * VALIDATION_COST)

    base = dict(budget_s=budget_s, seconds_per_token=sec_per_token, probe_s=probe_s, rows_total=n,
                epochs_asked=tc.epochs, steps_asked=asked)
    full = cost(rows_all, asked)
    if full <= left:
        return Plan(rows=None, steps=asked, eta_s=full, decision="fits", **base)
    one_epoch = min(asked, per_epoch)
    if asked > per_epoch and cost(rows_all, one_epoch) <= left:
        lo, hi = one_epoch, asked  # the most steps that fit, at least one whole epoch
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cost(rows_all, mid) <= left else (lo, mid)
        return Plan(rows=None, steps=lo, eta_s=cost(rows_all, lo), decision="fewer epochs", **base)
    # One pass over fewer examples: the largest share that fits (cost grows with the rows kept).
    lo, hi = 1, n
    chosen = stratified_keep(n, 1, strata, tc.seed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rows, _ = stratified_keep(n, mid, strata, tc.seed)
        steps = min(asked, plan_steps(len(rows), tc)[1])
        if cost(rows, steps) <= left:
            lo, chosen = mid, (rows, _)
        else:
            hi = mid
    rows, dropped = chosen
    steps = min(asked, plan_steps(len(rows), tc)[1])
    return Plan(rows=rows, steps=steps, eta_s=cost(rows, steps), decision="fewer examples",
                dropped_by_stratum=dropped, **base)


def from_record(d: dict) -> Plan:
    keys = Plan.__dataclass_fields__
    return Plan(**{k: v for k, v in d.items() if k in keys})


def write(run_dir: Path, p: Plan) -> None:
    from ..fileio import write_json_atomic
    from ..runs import BUDGET

    write_json_atomic(Path(run_dir) / BUDGET, p.record())


def read(run_dir: Path) -> Plan | None:
    import json

    from ..runs import BUDGET

    path = Path(run_dir) / BUDGET
    return from_record(json.loads(path.read_text())) if path.exists() else None
