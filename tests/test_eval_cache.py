"""The eval cache (eval/cache.py): the base model's and the baseline's predictions are read back on a rerun,
identical, and recomputed when anything that determines them changes."""

import json
import random
import shutil

import pytest

from tuneloop.config import recipe_from_dict
from tuneloop.eval.cache import EvalCache, model_identity, workspace_cache_dir
from tuneloop.eval.compare import _prompted_key, _tfidf_key, evaluate_classify, prompted_cache_check
from tuneloop.runs import open_run
from tuneloop.train import train_run

WORDS = {"good": ["great", "tasty", "lovely", "perfect"], "bad": ["awful", "stale", "rotten", "bland"]}
SYSTEMS = ["base", "base_fewshot", "tfidf_logreg"]


def _reviews(path, n, seed):
    rng = random.Random(seed)
    rows = [{"review": f"the {rng.choice(['tea', 'jam', 'soup'])} was {rng.choice(WORDS[l])}", "score": l}
            for l in (("good" if i % 2 else "bad") for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def run_dir(tmp_path, tiny_llama_dir):
    recipe = recipe_from_dict({
        "name": "tiny-cache", "model": str(tiny_llama_dir),
        "data": {"train": _reviews(tmp_path / "train.jsonl", 48, 0), "test": _reviews(tmp_path / "test.jsonl", 24, 1),
                 "text_field": "review", "label_field": "score", "val_ratio": 0.0},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 1, "batch_size": 8, "max_length": 32, "precision": "fp32", "threads": 1},
        "eval": {"batch_size": 8, "fewshot_k": 2, "forgetting": False, "probe_sample": 0},
    })
    out, _ = train_run(recipe, tmp_path / "ws", show_progress=False)
    return out


def _eval(run, **kw):
    return evaluate_classify(run, systems=SYSTEMS, show_progress=False, print_results=False, **kw)


@pytest.mark.slow
def test_a_rerun_reads_every_cached_system_back_with_identical_predictions(run_dir, tmp_path):
    first = _eval(run_dir)
    assert all(first["systems"][s]["cached"] is False for s in SYSTEMS)
    store = workspace_cache_dir(run_dir)
    assert store == (tmp_path / "ws" / "cache" / "eval").resolve()
    assert len(list(store.glob("*.json"))) == 3 and not list(store.glob(".*tmp"))
    second = _eval(run_dir)
    assert second["cache"]["systems"] == {s: {"cached": True} for s in SYSTEMS}
    assert all(second["systems"][s]["cached"] for s in SYSTEMS)
    assert second["predictions"] == first["predictions"]
    assert second["settings"] == first["settings"]
    for s in SYSTEMS:  # metrics, and the speed as measured when computed
        for k in ("accuracy", "macro_f1", "uncalibrated_accuracy", "records_per_second"):
            assert second["systems"][s].get(k) == first["systems"][s].get(k), (s, k)
        assert second["cost"][s]["p50_ms"] == first["cost"][s]["p50_ms"]
    assert any("read from the eval cache" in n for n in second["notes"])
    # --no-cache recomputes: the same numbers, not read back
    fresh = _eval(run_dir, cache=False)
    assert not any(fresh["systems"][s]["cached"] for s in SYSTEMS)
    for s in SYSTEMS:
        for eid, p in first["predictions"][s].items():
            q = fresh["predictions"][s][eid]
            assert (p is None) == (q is None)
            if p is not None:
                assert q["label"] == p["label"] and q["probability"] == pytest.approx(p["probability"], abs=1e-5)


@pytest.mark.slow
def test_a_changed_prompt_or_test_set_is_recomputed(run_dir, tmp_path):
    _eval(run_dir)
    run = open_run(run_dir)
    run.recipe.eval.zero_shot_prompt = "Is this review good or bad?\n\n{text}\n\nAnswer: {choices}."
    rep = _eval(run)
    assert rep["systems"]["base"]["cached"] is False and rep["systems"]["base_fewshot"]["cached"] is False
    assert rep["systems"]["tfidf_logreg"]["cached"] is True  # the prompt does not touch it
    other = _reviews(tmp_path / "other.jsonl", 24, 7)
    rep = evaluate_classify(run_dir, test_path=other, systems=SYSTEMS, show_progress=False, print_results=False)
    assert not any(rep["systems"][s]["cached"] for s in SYSTEMS)


@pytest.mark.slow
def test_every_part_of_the_key_changes_it(run_dir, tmp_path, tiny_llama_dir):
    run = open_run(run_dir)
    labels = run.info.labels
    texts, gold = ["the tea was great", "the jam was awful"], ["good", "bad"]

    def key(name="base", r=run, t=texts, n=32):
        return _prompted_key(name, r.base_model_path(), r.info.dtype or "float32", r.recipe, labels, t, gold, n)

    base = key()
    assert base == key() and base is not None
    assert key(t=["the tea was lovely", "the jam was awful"]) != base  # the records scored
    assert key(t=texts, n=32) == base  # the records scored decide, not the test set they came from
    assert key(n=16) != base  # reading length
    assert key(name="base_fewshot") != key(name="base")
    run.info.dtype = "bfloat16"
    assert key() != base  # dtype
    run.info.dtype = None
    run.recipe.eval.verbalizer = {"good": "yes", "bad": "no"}
    assert key() != base  # label words
    run.recipe.eval.verbalizer = None
    few = key(name="base_fewshot")
    run.recipe.eval.fewshot_k = 4
    assert key(name="base_fewshot") != few  # the system's own settings
    # the weights: a copy is the same model; a changed tensor is another
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    run.recipe.eval.fewshot_k = 2
    run.info.model_path = str(copy)
    assert key() == base
    import torch
    from safetensors.torch import load_file, save_file

    f = next(copy.glob("*.safetensors"))
    w = load_file(f)
    name = next(iter(w))
    w[name] = w[name] + 1e-3 * torch.ones_like(w[name])
    save_file(w, f, metadata={"format": "pt"})
    assert model_identity(str(copy))["weights_sha256"] != model_identity(str(tiny_llama_dir))["weights_sha256"]
    assert key() != base
    # the baseline's key: its training data and the test records
    t = _tfidf_key(run.recipe, labels, texts, "fp", 0)
    assert t == _tfidf_key(run.recipe, labels, texts, "fp", 0) != _tfidf_key(run.recipe, labels, texts[:1], "fp", 0)


def test_a_damaged_or_foreign_entry_is_a_miss_and_outside_a_workspace_nothing_is_kept(tmp_path):
    store = EvalCache(tmp_path / "c")
    parts = {"a": 1}
    value, hit = store.fetch("base", parts, lambda: {"probs": [[0.5, 0.5]]})
    assert not hit and store.fetch("base", parts, lambda: pytest.fail("recomputed"))[1]
    f = next((tmp_path / "c").glob("base-*.json"))
    f.write_text("{not json")
    assert store.get("base", parts) is None
    assert store.fetch("base", parts, lambda: {"probs": [[1.0, 0.0]]}) == ({"probs": [[1.0, 0.0]]}, False)
    doc = json.loads(f.read_text())
    doc["parts"] = {"a": 2}  # a stored entry whose parts are not the asked ones is never an answer
    f.write_text(json.dumps(doc))
    assert store.get("base", parts) is None
    assert workspace_cache_dir(tmp_path / "somewhere" / "run") is None
    assert EvalCache(None).fetch("base", parts, lambda: {"x": 1}) == ({"x": 1}, False)


def test_a_cache_that_cannot_be_written_costs_a_recomputation_not_the_report(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = EvalCache(blocker / "eval")  # its parent is a file: every write fails
    assert store.fetch("base", {"a": 1}, lambda: {"x": 1}) == ({"x": 1}, False)


@pytest.mark.slow
def test_the_cli_reads_the_cache_and_no_cache_recomputes(run_dir):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    runner = CliRunner()
    for args, hit in ((["--no-cache"], False), ([], True)):
        res = runner.invoke(app, ["eval", str(run_dir), "--systems", "base,tfidf_logreg", "--no-progress", *args])
        assert res.exit_code == 0, res.output
        rep = json.loads((run_dir / "report.json").read_text())
        assert rep["systems"]["base"]["cached"] is hit and rep["cache"]["systems"]["tfidf_logreg"]["cached"] is hit


@pytest.mark.slow
def test_a_test_sample_scores_every_system_on_the_same_stratified_records(run_dir):
    full = _eval(run_dir)
    run = open_run(run_dir)
    run.recipe.eval.test_sample = 10
    rep = evaluate_classify(run, systems=SYSTEMS + ["tuned"], show_progress=False, print_results=False)
    assert rep["test"]["n"] == 10 and rep["test"]["fingerprint"] != full["test"]["fingerprint"]
    for s in SYSTEMS + ["tuned"]:
        # the same records for all, half of each label as in the whole set, and nothing read back from the
        # whole set's cache entries
        assert sum(rep["systems"][s]["confusion"][i][j] for i in range(2) for j in range(2)) == 10, s
        assert rep["systems"][s].get("cached") in (False, None), s
    assert len({frozenset(rep["predictions"][s]) for s in SYSTEMS + ["tuned"]}) == 1
    assert [rep["systems"]["tuned"]["per_class"][l]["support"] for l in ("bad", "good")] == [5, 5]
    assert any("stratified sample of 10 of the 24 test records" in n for n in rep["notes"])


# ----------------------------------------------------------------------------------------------------
# the generative tasks: sft's base answers, losses and forgetting scores; dpo's and reward's base system


def _chat(path, n):
    path.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "input": "",
                                        "output": f"It is {2 * i}."}) + "\n" for i in range(n)))
    return str(path)


def _pairs(path, n, offset=0):
    path.write_text("".join(json.dumps({"prompt": f"Who approves permit {i}?",
                                        "chosen": f"The city council approves permit {i}.",
                                        "rejected": "No idea, sorry."}) + "\n" for i in range(offset, offset + n)))
    return str(path)


def _generative_run(tmp_path, model, task, train, test=None, **ev):
    data = {"train": train, "val_ratio": 0.0, **({"test": test} if test else {"test_ratio": 0.25})}
    recipe = recipe_from_dict({
        "name": f"tiny-{task}", "task": task, "model": str(model), "data": data,
        "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "threads": 1, "max_length": 64},
        "eval": {"batch_size": 4, **ev},
    })
    out, _ = train_run(recipe, tmp_path / "ws", show_progress=False)
    return out


@pytest.mark.slow
def test_sft_base_answers_losses_and_forgetting_are_read_back_and_recomputed_on_change(tmp_path, tiny_llama_dir):
    from tuneloop.eval.textgen import evaluate_sft

    run_dir = _generative_run(tmp_path, tiny_llama_dir, "sft", _chat(tmp_path / "chat.jsonl", 24), forgetting=True,
                              max_new_tokens=6, probe_sample=0)

    def ev(r=run_dir, **kw):
        return evaluate_sft(r, out_dir=tmp_path / "out", show_progress=False, **kw)

    first = ev()
    gens = (tmp_path / "out" / "generations.jsonl").read_text()
    assert first["cache"]["systems"] == {"base": {"cached": False}}
    assert len(list(workspace_cache_dir(run_dir).glob("base-*.json"))) == 1
    second = ev()
    assert second["cache"]["systems"] == {"base": {"cached": True}} and second["systems"]["base"]["cached"]
    assert (tmp_path / "out" / "generations.jsonl").read_text() == gens  # both systems' answers, unchanged
    assert second["predictions"] == first["predictions"]
    for k in ("perplexity", "rougeL", "bleu", "seconds"):
        assert second["systems"]["base"][k] == first["systems"]["base"][k], k
    assert second["cost"]["base"] == first["cost"]["base"]
    assert second["forgetting"] == first["forgetting"]  # the base's general-text scores came back too
    assert any("read from the eval cache" in n for n in second["notes"])
    # the tuned system is never cached; --no-cache recomputes the base, to the same answers
    fresh = ev(cache=False)
    assert fresh["systems"]["base"]["cached"] is False
    assert (tmp_path / "out" / "generations.jsonl").read_text() == gens
    assert fresh["systems"]["base"]["perplexity"] == pytest.approx(first["systems"]["base"]["perplexity"], rel=1e-5)
    # anything that changes the base's answers misses: a longer answer budget
    run = open_run(run_dir)
    run.recipe.eval.max_new_tokens = 3
    assert ev(run)["systems"]["base"]["cached"] is False


@pytest.mark.slow
def test_dpo_and_reward_base_systems_are_read_back(tmp_path, tiny_llama_dir):
    from tuneloop.eval.tasks import evaluate_run

    train, test = _pairs(tmp_path / "pairs.jsonl", 12), _pairs(tmp_path / "held.jsonl", 4, offset=100)
    dpo = _generative_run(tmp_path, tiny_llama_dir, "dpo", train, test, max_new_tokens=6)
    first = evaluate_run(dpo, out_dir=tmp_path / "a", show_progress=False)
    assert first["settings"]["reference"] == "base" and first["systems"]["base"]["cached"] is False
    second = evaluate_run(dpo, out_dir=tmp_path / "b", show_progress=False)
    assert second["systems"]["base"]["cached"] is True
    # the implicit reward of tuned is measured against the cached base log-probs: the same numbers
    assert second["systems"]["tuned"]["preference_accuracy"] == first["systems"]["tuned"]["preference_accuracy"]
    assert second["systems"]["tuned"]["reward_margin"] == pytest.approx(first["systems"]["tuned"]["reward_margin"])
    assert second["predictions"] == first["predictions"]
    assert evaluate_run(dpo, out_dir=tmp_path / "c", show_progress=False, cache=False)["systems"]["base"][
        "cached"] is False

    reward = _generative_run(tmp_path, tiny_llama_dir, "reward", train, test)
    r1 = evaluate_run(reward, out_dir=tmp_path / "d", show_progress=False)
    r2 = evaluate_run(reward, out_dir=tmp_path / "e", show_progress=False)
    assert r1["systems"]["base"]["cached"] is False and r2["systems"]["base"]["cached"] is True
    assert r2["predictions"]["base"] == r1["predictions"]["base"]
    assert r2["cache"]["systems"] == {"base": {"cached": True}}
    # the dpo run's base (the policy, adapter off, with its generations) is another entry than the reward's
    # (the base as a zero-shot judge): three files, the dpo base's kept once
    assert len(list(workspace_cache_dir(dpo).glob("base-*.json"))) == 2


def test_samples_are_nested_so_a_rerun_with_another_test_sample_reuses_the_prompted_systems():
    from collections import Counter

    from tuneloop.data.records import Record
    from tuneloop.eval.compare import _sample_indices

    recs = [Record(text=f"review {i}", label="great" if i % 3 else "other", source=f"t:{i}") for i in range(1000)]
    seen = []
    for n_test in (231, 399, 417, 470):  # what the quickstart's budget chose in four runs
        test = [recs[i] for i in _sample_indices(recs, n_test, 0)]
        assert len(test) == n_test
        assert Counter(r.label for r in test)["great"] == round(n_test * 666 / 1000)  # the label shares kept
        seen.append([r.text for r in (test[i] for i in _sample_indices(test, 100, 0))])
    assert all(s == seen[0] for s in seen) and len(seen[0]) == 100
    # a smaller test sample is inside a larger one; another seed is another sample
    small, large = (set(_sample_indices(recs, n, 0)) for n in (231, 470))
    assert small <= large and set(_sample_indices(recs, 231, 1)) != small


@pytest.mark.slow
def test_the_prompted_sample_is_read_back_when_only_the_test_sample_size_changed(run_dir):
    run = open_run(run_dir)
    run.recipe.eval.prompted_sample = 10
    run.recipe.eval.test_sample = 16
    first = evaluate_classify(run, systems=SYSTEMS, show_progress=False, print_results=False)
    run.recipe.eval.test_sample = 20  # another budget, another test sample: the same 10 prompted records
    second = evaluate_classify(run, systems=SYSTEMS, show_progress=False, print_results=False)
    assert first["systems"]["base"]["n"] == second["systems"]["base"]["n"] == 10
    assert second["systems"]["base"]["cached"] and second["systems"]["base_fewshot"]["cached"]
    assert second["systems"]["tfidf_logreg"]["cached"] is False  # it scores the whole test sample
    # the same answers (example ids carry the record's place in its test sample, which moved)
    def answers(rep):
        return sorted((v["label"], v["probability"]) for v in rep["predictions"]["base"].values() if v)

    assert answers(second) == answers(first) and len(answers(first)) == 10


@pytest.mark.slow
def test_before_training_the_quickstart_can_tell_which_prompted_samples_are_cached(run_dir):
    # prompted_cache_check answers with the keys evaluate_classify uses, from the recipe alone (the quickstart
    # asks it before the run exists): a yes it gives must be a hit, a no a miss.
    run = open_run(run_dir)
    ws = run_dir.parent.parent
    cached = prompted_cache_check(run.recipe, ws, "float32")
    assert not cached(16, 10)  # nothing evaluated yet
    run.recipe.eval.prompted_sample, run.recipe.eval.test_sample = 10, 16
    evaluate_classify(run, systems=SYSTEMS, show_progress=False, print_results=False)
    assert cached(16, 10) and cached(20, 10) and cached(None, 10)  # nested: any test sample holds the same 10
    assert not cached(16, 8) and not cached(16, None)  # another prompted sample
    assert not prompted_cache_check(run.recipe, ws, "bfloat16")(16, 10)  # another dtype: another key
    run.recipe.eval.systems = ["tuned", "tfidf_logreg"]
    assert not prompted_cache_check(run.recipe, ws, "float32")(16, 10)  # no prompted system: nothing to save
    run.recipe.eval.systems = ["base", "tuned"]
    assert prompted_cache_check(run.recipe, ws, "float32")(16, 10)
    # what it said is what the evaluation finds
    run.recipe.eval.test_sample = 20
    rep = evaluate_classify(run, systems=["base"], show_progress=False, print_results=False)
    assert rep["systems"]["base"]["cached"] is True
