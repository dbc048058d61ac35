"""The classify recipe end to end on a tiny Llama built from a config (offline, seconds)."""

import json
import random

import pytest

from tuneloop.config import recipe_from_dict
from tuneloop.eval.compare import evaluate_classify
from tuneloop.train import train_run

POS = ["great", "tasty", "lovely", "perfect", "delicious", "excellent"]
NEG = ["awful", "stale", "broken", "rotten", "bland", "terrible"]


def make_reviews(path, n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "good" if i % 2 else "bad"
        words = POS if label == "good" else NEG
        rows.append({"review": f"the {rng.choice(['tea', 'jam', 'soup'])} was {rng.choice(words)}", "score": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def recipe(tmp_path, tiny_llama_dir):
    def make(**train):
        return recipe_from_dict({
            "name": "tiny-reviews",
            "model": str(tiny_llama_dir),
            "data": {"train": make_reviews(tmp_path / "train.jsonl", 96, 0),
                     "test": make_reviews(tmp_path / "test.jsonl", 40, 1),
                     "text_field": "review", "label_field": "score", "val_ratio": 0.0},
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "head_lr": 1e-2, "max_length": 32,
                      "precision": "fp32", "threads": 1, **train},
            "eval": {"batch_size": 16},
        })
    return make


@pytest.mark.slow
def test_train_writes_a_complete_run_folder_and_loss_falls(recipe, tmp_path):
    run_dir, m = train_run(recipe(), tmp_path / "ws", show_progress=False)
    for f in ("recipe.yaml", "data.json", "labels.json", "train_metrics.json", "history.json",
              "model/adapter_config.json"):
        assert (run_dir / f).exists(), f
    assert not list(run_dir.glob(".*tmp"))  # atomic writes leave no temp folders behind
    hist = json.loads((run_dir / "history.json").read_text())["train"]  # one shape for every task
    first = sum(h["loss"] for h in hist[:4]) / 4
    last = sum(h["loss"] for h in hist[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert m["steps"] == 48 and json.loads((run_dir / "labels.json").read_text()) == ["bad", "good"]
    assert len(json.loads((run_dir / "data.json").read_text())["fingerprint"]) == 64
    assert (tmp_path / "ws" / "mlflow.db").exists()


@pytest.mark.slow
def test_eval_compares_four_systems_and_tuned_learns(recipe, tmp_path):
    run_dir, _ = train_run(recipe(), tmp_path / "ws", show_progress=False)
    rep = evaluate_classify(run_dir, show_progress=False, print_results=False)
    assert set(rep["systems"]) == {"base", "base_fewshot", "tuned", "tfidf_logreg"}
    for s in rep["systems"].values():
        assert 0 <= s["accuracy"] <= 1 and "macro_f1" in s and s["n"] == 40
    assert rep["systems"]["tuned"]["accuracy"] >= 0.9
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["systems"]["tuned"]["accuracy"] == rep["systems"]["tuned"]["accuracy"]
    html = (run_dir / "report.html").read_text()
    # a confusion matrix per system, the reliability diagram, and the slice gaps per system
    assert html.count('alt="confusion matrix of') == 4 and html.count('alt="reliability diagram') == 1
    assert html.count('alt="slice gaps of') == 4
    for name, s in rep["systems"].items():
        lo, hi = rep["intervals"][name]["accuracy"]
        assert lo <= s["accuracy"] <= hi
        assert 0 <= rep["calibration"][name]["ece"] <= 1 and rep["cost"][name]["records_per_second"] > 0
    assert {(t["a"], t["b"]) for t in rep["tests"]} == {("tuned", "base"), ("tuned", "base_fewshot"),
                                                        ("tuned", "tfidf_logreg")}


@pytest.mark.slow
def test_prompted_baselines_calibrated_few_shot_and_sampled(recipe, tmp_path):
    r = recipe(max_steps=2)
    r.eval.prompted_sample = 16
    r.eval.fewshot_k = 4
    run_dir, _ = train_run(r, tmp_path / "ws", show_progress=False)
    rep = evaluate_classify(run_dir, systems=["base", "base_fewshot", "tuned"], show_progress=False,
                            print_results=False)
    few, base = rep["settings"]["base_fewshot"], rep["settings"]["base"]
    # 4 training examples, 2 of each label, and the prompt the report shows holds them
    assert few["k"] == 4 and sorted(few["shot_labels"]) == ["bad", "bad", "good", "good"]
    assert few["prompt"].count("Text: the ") == 4 and few["prompt"].count("{text}") == 1
    assert base["k"] == 0 and base["calibration"] == "contextual"
    assert sum(base["content_free_prior"].values()) == pytest.approx(1.0)
    for name in ("base", "base_fewshot"):
        s = rep["systems"][name]
        # a stratified sample: 8 of each label, stated in the report, the rest predicted by nobody
        assert s["n"] == 16 and s["sampled"] and "uncalibrated_accuracy" in s
        assert sum(p is not None for p in rep["predictions"][name].values()) == 16
        assert [c["support"] for c in s["per_class"].values()] == [8, 8]
    assert any("stratified sample of 16 of 40" in n for n in rep["notes"])
    # paired on the 16 both predicted
    assert {t["n"] for t in rep["tests"]} == {16}


@pytest.mark.slow
def test_max_steps_and_bf16_path(recipe, tmp_path):
    _, m = train_run(recipe(max_steps=3, precision="bf16"), tmp_path / "ws", show_progress=False)
    assert m["steps"] == 3 and m["dtype"] == "bfloat16"


@pytest.mark.slow
def test_full_finetuning(recipe, tmp_path):
    r = recipe(max_steps=2)
    r.method.name = "full"
    run_dir, m = train_run(r, tmp_path / "ws", show_progress=False)
    assert (run_dir / "model" / "config.json").exists() and m["trainable_params"] == m["total_params"]
    rep = evaluate_classify(run_dir, systems=["tuned"], show_progress=False, print_results=False)
    assert rep["systems"]["tuned"]["n"] == 40


@pytest.mark.slow
def test_frozen_layer_cache_changes_no_result(recipe, tmp_path):
    """Adapters on the top block only, four epochs: epochs 2-4 replay the bottom block's kept output,
    and every step's loss equals the run that computes it each time."""
    runs = {}
    for cached in (True, False):
        r = recipe(cache_frozen=cached)
        r.method.top_layers = 1
        run_dir, m = train_run(r, tmp_path / f"ws{cached}", show_progress=False)
        runs[cached] = ([h["loss"] for h in json.loads((run_dir / "history.json").read_text())["train"]], m)
    (with_cache, m_on), (without, m_off) = runs[True], runs[False]
    assert m_on["frozen_cache_bytes"] > 0 and m_off["frozen_cache_bytes"] is None
    assert len(with_cache) == len(without) == 48
    assert with_cache == pytest.approx(without, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_the_budgets_probe_times_whole_forwards_not_the_frozen_layer_cache(recipe, tmp_path, monkeypatch):
    """The probe sees one batch twice (warm-up, then timed): through the cache that second sight ran the
    replay check inside the timing. It must capture nothing and check nothing; epoch 2 checks once."""
    from tuneloop.train import budget as budgets
    from tuneloop.train.fastpath import FrozenPrefixCache

    in_probe, seen = [False], []
    real_measure, real_verify, real_capture = budgets.measure, FrozenPrefixCache.verify, FrozenPrefixCache.capture

    def measure(*a, **k):
        in_probe[0] = True
        try:
            return real_measure(*a, **k)
        finally:
            in_probe[0] = False

    def spy(kind, real):
        def f(self, *a, **k):
            seen.append((kind, in_probe[0]))
            return real(self, *a, **k)
        return f

    monkeypatch.setattr(budgets, "measure", measure)
    monkeypatch.setattr(FrozenPrefixCache, "verify", spy("verify", real_verify))
    monkeypatch.setattr(FrozenPrefixCache, "capture", spy("capture", real_capture))
    r = recipe(cache_frozen=True, epochs=2, time_budget="1h")
    r.method.top_layers = 1
    _, m = train_run(r, tmp_path / "ws", show_progress=False)
    assert m["budget"]["decision"] == "fits" and m["frozen_cache_bytes"] > 0
    assert not [k for k, probing in seen if probing]
    assert [k for k, _ in seen].count("verify") == 1 and [k for k, _ in seen].count("capture") == 12


@pytest.mark.slow
def test_frozen_layer_cache_stays_off_for_one_epoch_or_all_layers(recipe, tmp_path):
    r = recipe(epochs=1)
    r.method.top_layers = 1
    assert train_run(r, tmp_path / "a", show_progress=False)[1]["frozen_cache_bytes"] is None
    assert train_run(recipe(max_steps=14), tmp_path / "b", show_progress=False)[1]["frozen_cache_bytes"] is None


@pytest.mark.slow
def test_eval_reads_as_far_as_eval_max_length_and_serving_follows(recipe, tmp_path, monkeypatch):
    from tuneloop.eval import compare
    from tuneloop.runs import load_for_inference

    r = recipe(max_steps=2)
    r.eval.max_length = 48
    run_dir, _ = train_run(r, tmp_path / "ws", show_progress=False)
    seen = []
    real = compare.predict_classifier

    def spy(model, tok, texts, batch_size, max_length, *a, **k):
        seen.append(max_length)
        return real(model, tok, texts, batch_size, max_length, *a, **k)

    monkeypatch.setattr(compare, "predict_classifier", spy)
    evaluate_classify(run_dir, systems=["tuned"], show_progress=False, print_results=False)
    assert seen == [48]  # training read 32
    assert load_for_inference(run_dir).input.max_length == 48


def test_validation_split_is_stratified_deterministic_and_off_at_zero():
    from tuneloop.data.records import Record
    from tuneloop.train.classify import stratified_holdout

    recs = [Record(text=f"t{i}", label="a" if i % 4 else "b") for i in range(80)]  # 60 a, 20 b
    kept, held = stratified_holdout(recs, 0.25, 7)
    assert sorted(r.label for r in held).count("a") == 15 and [r.label for r in held].count("b") == 5
    assert len(kept) + len(held) == 80 and not {id(r) for r in kept} & {id(r) for r in held}
    assert [r.text for r in kept] == [r.text for r in recs if r in kept]  # the records' order is kept
    assert [r.text for r in held] == [r.text for r in stratified_holdout(recs, 0.25, 7)[1]]
    assert [r.text for r in held] != [r.text for r in stratified_holdout(recs, 0.25, 8)[1]]
    kept0, held0 = stratified_holdout(recs, 0.0, 7)
    assert held0 == [] and kept0 == recs


@pytest.mark.slow
def test_validation_early_stop_keeps_the_best_checkpoint(recipe, tmp_path):
    """Random labels: validation loss must rise once the head memorises them. The run stops early, warns
    about overfitting, and `model/` holds the best validation weights, not the last."""
    import random

    from tuneloop.runs import load_for_inference

    rng = random.Random(3)
    data = tmp_path / "noise.jsonl"
    data.write_text("".join(json.dumps({"review": " ".join(rng.choice(POS + NEG) for _ in range(4)),
                                        "score": rng.choice(["good", "bad"])}) + "\n" for _ in range(96)))
    r = recipe(epochs=30, lr=2e-2, head_lr=5e-2, eval_every=4, patience=3, overfit_window=2)
    r.data.train, r.data.val_ratio = str(data), 0.25
    run_dir, m = train_run(r, tmp_path / "ws", show_progress=False)
    assert json.loads((run_dir / "data.json").read_text())["val_records"] == 24
    assert m["examples"] == 72 and m["stopped_early"] and m["best_step"] < m["steps"]
    assert m["overfit_warning_step"] is not None
    vals = json.loads((run_dir / "history.json").read_text())["validation"]
    assert [v[0] for v in vals] == list(range(4, m["steps"] + 1, 4)) and min(v[2] for v in vals) == m["best_val_loss"]
    # the saved weights score exactly the best validation loss
    assert m["val_loss"] == pytest.approx(m["best_val_loss"], abs=1e-6)
    assert (run_dir / "loss.png").exists() and not (run_dir / "checkpoints").exists()
    assert load_for_inference(run_dir).labels == ["bad", "good"]


@pytest.mark.slow  # torch.compile of the blocks: ~30 s on 2 cores
def test_compiled_blocks_train_the_same_on_every_batch_length(tmp_path, tiny_llama_dir):
    """`train.compile` on classification, whose batches are padded to their own longest review: the loss
    history matches the eager run, and each block variant compiles once for every length (dynamic shapes,
    a mask even for an unpadded batch, the budget's probe in training mode), never once per length."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    # three lengths, 22/21/21 reviews: sorted into batches of 8, some hold one length (no padding at all)
    # and some two
    rows = [{"review": "the soup was" + (" great" if i % 2 else " awful") * (1 + i % 6 // 2),
             "score": "good" if i % 2 else "bad"} for i in range(64)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hists = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        r = recipe_from_dict({
            "name": "tiny-lengths", "model": str(tiny_llama_dir),
            "data": {"train": str(data), "text_field": "review", "label_field": "score", "val_ratio": 0.0},
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "max_length": 32, "precision": "bf16",
                      "threads": 1, "compile": compiled, "time_budget": "10m", "cache_frozen": False},
        })
        run_dir, m = train_run(r, tmp_path / f"ws{compiled}", show_progress=False)
        hists.append([h["loss"] for h in json.loads((run_dir / "history.json").read_text())["train"]])
        graphs = counters["stats"]["unique_graphs"]
    assert len(hists[0]) == 8
    # bf16: the compiled kernels round differently from eager's, never by more than this
    assert hists[1] == pytest.approx(hists[0], rel=2e-2)
    # two variants of the block: the first one (its input needs no gradient) and the second
    assert graphs == 2
