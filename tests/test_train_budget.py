"""train.time_budget: the plan (budget.py) priced batch by batch, and a real run sized by it."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from tuneloop.config import duration_seconds, recipe_from_dict
from tuneloop.errors import ConfigError
from tuneloop.train import budget as budgets
from tuneloop.train import train_run
from tuneloop.train.common import plan_steps

from test_classify import make_reviews


def test_durations_parse_and_bad_ones_name_the_field(tiny_llama_dir):
    assert duration_seconds("8m") == 480 and duration_seconds("1h30m") == 5400
    assert duration_seconds("90s") == 90 and duration_seconds("2.5m") == 150 and duration_seconds(12) == 12
    for bad in ("8x", "", "m", "-3m", "0"):
        with pytest.raises(ConfigError):
            duration_seconds(bad)
    with pytest.raises(ConfigError, match="train.time_budget"):
        recipe_from_dict({"name": "x", "model": str(tiny_llama_dir), "data": {"train": "t.jsonl"},
                          "train": {"time_budget": "ten minutes"}})


def test_threads_come_from_the_recipe_then_omp_num_threads_then_every_core(monkeypatch):
    import os

    import torch

    from tuneloop.infer.device import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads(None)
        assert torch.get_num_threads() == 1
        for junk in ("", "0", "two"):  # unset or meaningless: every core, as without it
            monkeypatch.setenv("OMP_NUM_THREADS", junk)
            set_threads(None)
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads(2)  # the recipe's train.threads wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _tc(**kw):
    base = dict(epochs=1.0, max_steps=None, batch_size=8, grad_accum=1, seed=0, eval_every=None)
    return SimpleNamespace(**{**base, **kw})


def _plan(budget_s, lengths, strata=None, rate=1e-3, **tc):
    return budgets.plan(budget_s, rate, 0.0, lengths, _tc(**tc), strata, 0, lambda s, e: 0, plan_steps)


LENGTHS = [10 + (i * 37) % 90 for i in range(400)]
LABELS = ["rare" if i % 5 == 0 else "common" for i in range(400)]


def test_everything_fits_when_the_budget_allows():
    cost = budgets.steps_cost(LENGTHS, list(range(400)), 8, 1, 0, 50, 1e-3)
    p = _plan(cost / (1 - budgets.RESERVE) + 1, LENGTHS, epochs=1.0)
    assert p.decision == "fits" and p.rows is None and p.steps == 50
    assert p.eta_s == pytest.approx(cost)


def test_epochs_are_cut_before_examples():
    one_epoch = budgets.steps_cost(LENGTHS, list(range(400)), 8, 1, 0, 50, 1e-3)
    p = _plan(2.5 * one_epoch / (1 - budgets.RESERVE), LENGTHS, epochs=4.0)
    assert p.decision == "fewer epochs" and p.rows is None
    assert 100 <= p.steps < 200  # between 2 and 4 epochs' steps, never more than the budget buys
    assert p.eta_s <= 2.5 * one_epoch + 1e-9
    assert budgets.steps_cost(LENGTHS, list(range(400)), 8, 1, 0, p.steps + 1, 1e-3) > 2.5 * one_epoch


def test_examples_are_cut_stratified_and_seeded_when_one_epoch_does_not_fit():
    one_epoch = budgets.steps_cost(LENGTHS, list(range(400)), 8, 1, 0, 50, 1e-3)
    p = _plan(0.5 * one_epoch / (1 - budgets.RESERVE), LENGTHS, LABELS, epochs=3.0)
    assert p.decision == "fewer examples" and p.rows is not None
    assert 150 <= len(p.rows) <= 210 and p.eta_s <= 0.5 * one_epoch
    kept = Counter(LABELS[i] for i in p.rows)
    assert kept["rare"] / len(p.rows) == pytest.approx(0.2, abs=0.01)  # the class shares stay
    assert p.dropped_by_stratum == {"common": 320 - kept["common"], "rare": 80 - kept["rare"]}
    assert p.steps == plan_steps(len(p.rows), _tc())[1]  # one pass over what is kept
    again = _plan(0.5 * one_epoch / (1 - budgets.RESERVE), LENGTHS, LABELS, epochs=3.0)
    assert again.rows == p.rows  # deterministic for a seed
    other = _plan(0.5 * one_epoch / (1 - budgets.RESERVE), LENGTHS, LABELS, epochs=3.0, seed=1)
    assert other.rows != p.rows
    assert "left out" in p.message() and "rare" in p.message()


def test_validations_are_priced_into_the_plan():
    lengths = [40] * 160
    no_val = budgets.plan(100.0, 1e-3, 0.0, lengths, _tc(epochs=3.0), None, 0, lambda s, e: 0, plan_steps)
    with_val = budgets.plan(100.0, 1e-3, 0.0, lengths, _tc(epochs=3.0), None, 4000,
                            lambda s, e: s // e + (1 if s % e else 0), plan_steps)
    assert no_val.decision == "fits" and with_val.eta_s > no_val.eta_s


@pytest.fixture
def reviews(tmp_path, tiny_llama_dir):
    def make(**train):
        return recipe_from_dict({
            "name": "budgeted", "model": str(tiny_llama_dir),
            "data": {"train": make_reviews(tmp_path / "train.jsonl", 96, 0),
                     "test": make_reviews(tmp_path / "test.jsonl", 16, 1),
                     "text_field": "review", "label_field": "score", "val_ratio": 0.0},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "max_length": 32, "precision": "fp32",
                      "threads": 1, **train},
        })
    return make


@pytest.mark.slow
def test_a_run_is_sized_to_its_budget_and_records_the_plan(reviews, tmp_path, monkeypatch):
    # The machine's speed is pinned so the plan is exact: 12 batches of 8 per epoch at a known price.
    monkeypatch.setattr(budgets, "measure", lambda *a, **k: (1e-3, 0.0))
    r = reviews(time_budget="1h")
    run_dir, m = train_run(r, tmp_path / "ws", show_progress=False)
    plan = json.loads((run_dir / "budget.json").read_text())
    assert plan["decision"] == "fits" and m["steps"] == 24 and m["budget"]["stopped_at_budget"] is None
    # now a budget that buys only part of one epoch: fewer reviews, both labels kept in their shares
    tight = plan["eta_s"] / 2 * 0.5 / (1 - budgets.RESERVE)
    run_dir, m = train_run(reviews(time_budget=f"{tight}s"), tmp_path / "ws", show_progress=False)
    plan = json.loads((run_dir / "budget.json").read_text())
    assert plan["decision"] == "fewer examples" and plan["kept"] < 96
    assert m["steps"] == plan["steps"] < 12 and m["budget"]["kept"] == plan["kept"]
    assert set(plan["dropped_by_stratum"]) == {"bad", "good"}


@pytest.mark.slow
def test_training_stops_when_the_budget_is_spent(reviews, tmp_path, monkeypatch):
    # A machine far slower than measured: the plan says everything fits, the clock says stop.
    monkeypatch.setattr(budgets, "measure", lambda *a, **k: (1e-12, 0.0))
    run_dir, m = train_run(reviews(time_budget="1s", max_steps=100000), tmp_path / "ws", show_progress=False)
    assert m["budget"]["decision"] == "fits" and m["budget"]["stopped_at_budget"] is not None
    assert m["steps"] == m["budget"]["stopped_at_budget"] < 100000
    # what it really trained on is said, not what the plan kept
    b = m["budget"]
    assert b["trained_rows"] == min(b["kept"], m["steps"] * 8)
    from tuneloop.eval.report import budget_summary

    line = budget_summary({"budget": {"total_s": 60, "wall_s": 61, "eval_estimate_s": 10, "train": b},
                           "systems": {"tuned": {"accuracy": 0.5}}})
    if b["trained_rows"] < b["kept"]:
        assert f"trained on {b['trained_rows']:,} of {b['rows_total']:,} reviews (the plan kept {b['kept']:,}" in line
    assert f"stopped at step {m['steps']}" in line


def test_the_probe_changes_no_weight_and_leaves_no_gradient(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [torch.randint(0, 100, (8 + i % 20,)) for i in range(40)]

    def loss_fn(m, mine, batch):
        n = max(len(rows[i]) for i in mine)
        ids = torch.stack([torch.nn.functional.pad(rows[i], (0, n - len(rows[i]))) for i in mine])
        return m(input_ids=ids, labels=ids).loss

    rate, spent = budgets.measure(model, loss_fn, [len(r) for r in rows], 8, 0, torch.device("cpu"), False)
    assert rate > 0 and spent > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_probe_batch_that_compiled_is_timed_again(monkeypatch):
    """Under train.compile a timed batch can meet a graph variant the warm-up did not (a cold Inductor cache
    took minutes on a 2-core AVX2 CPU): its time is the compiler's, so the batch runs again and that run
    is what counts. Here a batch's first run 'compiles' (the counter moves) and takes 0.3 s more."""
    import time

    import torch

    model = torch.nn.Module()
    model.w = w = torch.nn.Parameter(torch.ones(3))
    compiled = {"n": 0}
    seen: Counter = Counter()

    def loss_fn(m, mine, batch):
        key = tuple(mine)
        seen[key] += 1
        if seen[key] == 1:
            compiled["n"] += 1
            time.sleep(0.3)
        return (w * len(mine)).sum()

    lengths = [4 + i % 9 for i in range(64)]
    monkeypatch.setattr(budgets, "compilations", lambda: compiled["n"])
    rate, spent = budgets.measure(model, loss_fn, lengths, 8, 0, torch.device("cpu"), False)
    warm, *timed = budgets.probe_batches(lengths, 8, 0)
    tokens = sum(len(b) * max(lengths[i] for i in b) for b in timed)
    # each batch ran once more after the run that compiled; the warm-up batch is also one of the timed ones
    assert seen == Counter({tuple(b): 2 + (b == warm) for b in timed})
    # the 0.3 s runs are not in the rate
    assert rate * tokens < 0.1
    assert spent > 0.3 * len(seen)
    assert w.grad is None


@pytest.mark.slow
def test_the_quickstart_sizes_training_to_what_its_evaluation_leaves(tmp_path, tiny_llama_dir, monkeypatch):
    # The whole `tuneloop quickstart --budget` path on a tiny model: the eval estimate is measured, training
    # gets the rest, and the report says both (a wrong import here once broke `make quickstart` unseen).
    import yaml

    from tuneloop import quickstart

    recipe = {"name": "qs-tiny", "task": "classify", "model": str(tiny_llama_dir),
              "data": {"train": make_reviews(tmp_path / "train.jsonl", 64, 0),
                       "test": make_reviews(tmp_path / "test.jsonl", 24, 1),
                       "text_field": "review", "label_field": "score", "val_ratio": 0.0},
              "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "max_length": 32, "precision": "fp32",
                        "threads": 1, "compile": True},
              "eval": {"systems": ["tuned", "tfidf_logreg"], "batch_size": 8}}
    path = tmp_path / "qs.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(quickstart, "RECIPE", path)
    report = quickstart.run_quickstart(tmp_path / "ws", show_progress=False, budget="5m")
    plan = report["budget"]
    assert plan["total_s"] == 300 and plan["eval_estimate_s"] >= 0 and plan["forward_tokens_per_s"] > 0
    assert 60 <= plan["train_budget_s"] < 300 and plan["train"]["decision"] == "fits"
    assert set(report["systems"]) >= {"tuned", "tfidf_logreg"}
    # under 6 minutes of training the recipe's compile does not pay back: the run trained eager
    assert plan["compile"] is False
    (saved,) = (tmp_path / "ws" / "runs").glob("*/recipe.yaml")
    assert yaml.safe_load(saved.read_text())["train"]["compile"] is False


def test_the_quickstart_compiles_only_when_training_is_long_enough_or_asked():
    from tuneloop.quickstart import COMPILE_MIN_TRAIN_S, compile_pays

    assert not compile_pays(COMPILE_MIN_TRAIN_S - 1, None)
    assert compile_pays(COMPILE_MIN_TRAIN_S, [])
    assert compile_pays(60, ["train.compile=true"]) and compile_pays(60, [" train.compile = false"])
    assert not compile_pays(60, ["train.compile_mode=x", "train.seed=1"])


def test_the_quickstart_cuts_the_evaluation_prompted_sample_first_then_the_test_set():
    from tuneloop.quickstart import PROMPTED_FLOOR, TEST_FLOOR, size_evaluation

    # fits: nothing cut
    assert size_evaluation(300.0, 400.0, 1000, 200) == (1000, 200, pytest.approx(300.0))
    # a little over: only the prompted systems' sample shrinks, and what is left fits
    nt, npr, s = size_evaluation(300.0, 270.0, 1000, 200)
    assert nt == 1000 and PROMPTED_FLOOR <= npr < 200 and s <= 270.0
    # far over (a CPU computing in fp32): the prompted sample at its floor, every system on a smaller sample
    nt, npr, s = size_evaluation(742.0, 260.0, 1000, 200)
    assert npr == PROMPTED_FLOOR and TEST_FLOOR <= nt < 1000 and s <= 260.0 and s > 240.0
    # impossible: both floors hold, and the estimate says what that costs
    nt, npr, s = size_evaluation(5000.0, 60.0, 1000, 200)
    assert (nt, npr) == (TEST_FLOOR, PROMPTED_FLOOR) and s > 60.0
    # a test set smaller than the floors is never sampled above its size
    assert size_evaluation(500.0, 10.0, 150, 150)[:2] == (150, 100)


def test_a_cached_prompted_sample_costs_the_quickstart_nothing():
    from tuneloop.quickstart import PROMPTED_PART, PROMPTED_STEP, size_evaluation

    asked = []

    def cached_at(n):
        def cached(nt, npr):
            asked.append((nt, npr))
            return npr == n
        return cached

    # the whole evaluation fits once base and few-shot are read back: nothing cut, their share not counted
    nt, npr, s = size_evaluation(300.0, 250.0, 1000, 200, cached_at(200))
    assert (nt, npr) == (1000, 200) and s == pytest.approx(300.0 * (1 - PROMPTED_PART))
    assert size_evaluation(300.0, 250.0, 1000, 200)[:2] != (1000, 200)  # without the cache it is cut
    # far over: the prompted sample at its floor is cached, so the test sample grows into its time
    plain = size_evaluation(742.0, 260.0, 1000, 200)
    nt, npr, s = size_evaluation(742.0, 260.0, 1000, 200, cached_at(100))
    assert npr == plain[1] == 100 and nt > plain[0] and s <= 260.0
    # the prompted cut is in whole steps, so a rerun at a slightly different speed draws the same sample
    cuts = {size_evaluation(300.0 * f, 270.0, 1000, 200)[1] for f in (1.0, 1.03, 1.06)}
    assert len(cuts) == 1 and all(c % PROMPTED_STEP == 0 for c in cuts)
    # a cached sample that a differently sized test sample would not draw again is priced as computed
    def only_full(nt, npr):
        return npr == 100 and nt == 1000

    nt, npr, s = size_evaluation(742.0, 260.0, 1000, 200, only_full)
    assert (nt, npr) == plain[:2] and s == pytest.approx(plain[2])
