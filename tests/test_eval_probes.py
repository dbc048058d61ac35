"""Slices, counterfactual bias probes and the forgetting check (eval/slices.py, probes.py, forgetting.py):
swaps are whole-word, case-kept and reversible; team names and dishes are not probed; a model that depends
on a protected term is flagged and one that ignores it is not; the worst slice of a constructed case is
found; forgetting is zero for an untouched model and not for a perturbed one."""

import json
import random
import re

import numpy as np
import pytest
import torch

from tuneloop.eval.forgetting import (backbone_logits, causal_logits, compare_general, general_passages,
                                      general_questions, general_scores)
from tuneloop.eval.probes import load_lexicon, mentions, run_probes, swap, variants
from tuneloop.eval.slices import slice_report

LX = load_lexicon()


def gender_swap(text):
    return swap(text, "gender", "male", "female", LX)


def test_swap_is_whole_word_case_kept_and_grammatical():
    assert gender_swap("He gave her his book.") == "She gave him her book."
    assert gender_swap("I saw her car and told her.") == "I saw his car and told him."
    assert gender_swap("The seat is hers, said John.") == "The seat is his, said Patricia."
    # inside words and other words that start like a term: untouched
    assert gender_swap("The theme: the hero, Sheila, shepherds them") == "The theme: the hero, Sheila, shepherds them"
    assert gender_swap("HE said so; my mother-in-law agreed") == "SHE said so; my father-in-law agreed"
    # a capitalised list term (a given name) is not the lower-case word
    assert gender_swap("Mark will mark it, John's pen") == "Mark will mark it, Patricia's pen"


@pytest.mark.parametrize("text", [
    "He told his wife that she should call him.",
    "My Muslim neighbor goes to the mosque with other Muslims.",
    "Black customers and white people waited; Mexicans and Indians too.",
    "The young man and the teenagers met a retiree.",
    "JOHN and Mary, her husband and his sister",
])
def test_every_swap_is_reversible(text):
    vs = variants([text], LX, random.Random(0), per_category=8)
    assert vs, text
    for sw, (new,) in vs:
        assert new != text
        assert swap(new, sw.category, sw.a, sw.b, LX) == text, (sw, new)


@pytest.mark.parametrize("text", [
    "The Indians beat the Giants and the Celtics lost.",
    "Cleveland Indians fans cheered",
    "A glass of white wine and a cup of black tea.",
    "Black pepper, white rice and an old recipe",
    "Served on fine china; Uncle Ben's rice; Betty Crocker mix",
    "We did a blind taste test",
])
def test_team_names_and_food_are_not_probed(text):
    assert mentions(text, LX) == set()
    assert variants([text], LX, random.Random(0)) == []


def test_ambiguous_colour_and_age_words_count_only_before_a_person():
    assert mentions("black customers were served", LX) == {"race_ethnicity"}
    assert mentions("old people like it", LX) == {"age"}
    assert mentions("it is three years old", LX) == set()


def test_recipe_terms_extend_the_lists(tmp_path):
    extra = tmp_path / "terms.yaml"
    extra.write_text("categories:\n  gender:\n    groups:\n      titles:\n        columns: [male, female]\n"
                     "        rows:\n          - [king, queen]\nexclude:\n  - '\\bdairy queen\\b'\n")
    lx = load_lexicon(str(extra))
    assert swap("the king and he", "gender", "male", "female", lx) == "the queen and she"
    assert mentions("a Dairy Queen sundae", lx) == set()


def _texts(n=40):
    rng = random.Random(1)
    subjects = ["he", "she", "my husband", "my wife", "the store", "the box"]
    return [f"{rng.choice(subjects)} said the {rng.choice(['tea', 'jam'])} was {rng.choice(['fine', 'ok'])}"
            for _ in range(n)]


def test_a_model_that_depends_on_a_term_is_flagged_and_one_that_ignores_it_is_not():
    texts = _texts()
    depends = lambda xs: ["b" if re.search(r"\b(she|wife)\b", x, re.I) else "a" for x in xs]
    ignores = lambda xs: ["b" if "jam" in x else "a" for x in xs]
    hit = run_probes("classify", texts, depends, lexicon=LX, sample=12, threshold=0.05)
    miss = run_probes("classify", texts, ignores, lexicon=LX, sample=12, threshold=0.05)
    eligible = sum(1 for t in texts if re.search(r"\b(he|she|husband|wife)\b", t))
    assert hit["eligible"] == miss["eligible"] == eligible and hit["sampled"] == 12 <= eligible
    assert hit["flagged"] and hit["flagged_categories"] == ["gender"] and hit["rate"] == 1.0
    assert hit["changes"] and hit["interval"][0] <= hit["rate"] <= hit["interval"][1]
    assert not miss["flagged"] and miss["rate"] == 0.0 and miss["variants"] == hit["variants"] > 0

    values = lambda xs: [10.0 + ("she" in x.split()) for x in xs]  # regress: +10% when "she" appears
    reg = run_probes("regress", texts, values, lexicon=LX, sample=40, tolerance=0.05)
    assert reg["flagged"] and 0 < reg["rate"] < 1  # only inputs with he/she move, not husband/wife ones


def test_sft_probe_swaps_prompt_and_reference():
    convs = [[{"role": "user", "content": "Should he sign it?"}, {"role": "assistant", "content": "He should."}]]
    seen = []
    run_probes("sft", convs, lambda cs: seen.extend(cs) or [1.0] * len(cs), lexicon=LX, sample=5)
    assert seen[1] == [{"role": "user", "content": "Should she sign it?"},
                       {"role": "assistant", "content": "She should."}]


def test_slices_find_the_worst_region_with_an_interval():
    n = 200
    rng = random.Random(0)
    regions = ["north" if i % 4 else "south" for i in range(n)]  # 50 south
    examples = [{"id": str(i), "reference": "a", "meta": {"region": r}} for i, r in enumerate(regions)]
    correct = [r == "north" or rng.random() < 0.4 for r in regions]
    preds = {"tuned": {str(i): {"label": "a" if c else "b", "correct": c} for i, c in enumerate(correct)}}
    texts = ["x" * (10 + i) for i in range(n)]
    rep = slice_report("classify", examples, preds, texts, meta=[e["meta"] for e in examples], fields=["region"],
                       labels=["a", "b"], min_size=10)
    s = rep["systems"]["tuned"]
    worst = s["worst"]
    assert (worst["by"], worst["slice"], worst["n"]) == ("field:region", "south", 50)
    south = np.mean([c for c, r in zip(correct, regions) if r == "south"])
    assert worst["value"] == pytest.approx(south) and worst["gap"] == pytest.approx(south - np.mean(correct))
    lo, hi = worst["interval"]
    assert lo <= worst["gap"] <= hi < 0
    assert len([r for r in s["slices"] if r["by"] == "length"]) == 4
    assert all("macro_f1" in r for r in s["slices"])


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


@pytest.mark.slow
def test_forgetting_is_zero_untouched_and_nonzero_perturbed(tiny_lm, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_lm
    passages, questions = general_passages(6), general_questions()[:8]
    assert len(passages) == 6 and all(len(p) >= 200 for p in passages)
    dev = torch.device("cpu")
    base = general_scores(causal_logits(model), tok, dev, passages=passages, questions=questions)
    same = compare_general(base, general_scores(causal_logits(model), tok, dev, passages=passages,
                                                questions=questions), threshold=0.1)
    assert same["text"]["relative_change"] == 0 and same["questions"]["delta"] == 0 and not same["flagged"]

    other = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # (tied) embeddings scaled up: confident and wrong, as a badly over-tuned model is
        other.model.embed_tokens.weight.mul_(20)
    moved = compare_general(base, general_scores(causal_logits(other), tok, dev, passages=passages,
                                                 questions=questions), threshold=0.1)
    assert moved["text"]["relative_change"] > 0.1 and moved["flagged"]
    lo, hi = moved["text"]["interval"]
    assert 0 < lo <= moved["text"]["relative_change"] <= hi


def test_head_models_are_read_through_their_backbone(tiny_lm, tiny_llama_dir):
    from transformers import AutoModelForSequenceClassification

    model, tok = tiny_lm
    head = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2, dtype=torch.float32).eval()
    dev = torch.device("cpu")
    kw = {"passages": general_passages(3), "questions": general_questions()[:4]}
    a = general_scores(causal_logits(model), tok, dev, **kw)
    b = general_scores(backbone_logits(head, model.get_output_embeddings()), tok, dev, **kw)
    assert np.allclose(a["nll"], b["nll"], rtol=1e-5) and a["correct"] == b["correct"]


@pytest.mark.slow
def test_classify_report_has_slices_probes_and_forgetting(tmp_path, tiny_llama_dir):
    from tuneloop.config import recipe_from_dict
    from tuneloop.eval.compare import evaluate_classify
    from tuneloop.eval.schema import Report
    from tuneloop.train import train_run

    rng = random.Random(0)

    def rows(n):
        out = []
        for i in range(n):
            label = "good" if i % 2 else "bad"
            word = rng.choice(["tasty", "lovely"] if label == "good" else ["stale", "bland"])
            who = rng.choice(["he", "she", "my son", "the shop"])
            out.append({"review": f"{who} said the tea was {word}", "score": label,
                        "region": rng.choice(["north", "south"])})
        return out

    for name, n in (("train", 48), ("test", 24)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    recipe = recipe_from_dict({
        "name": "tiny-probes", "model": str(tiny_llama_dir),
        "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"),
                 "text_field": "review", "label_field": "score", "val_ratio": 0.0},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 3, "batch_size": 8, "max_length": 32, "precision": "fp32", "threads": 1},
        "eval": {"batch_size": 16, "systems": ["tuned", "tfidf_logreg"], "slices": ["region"], "probe_sample": 10},
    })
    run_dir, _ = train_run(recipe, tmp_path / "ws", show_progress=False)
    rep = evaluate_classify(run_dir, show_progress=False, print_results=False)
    Report.model_validate(rep)
    assert {r["slice"] for r in rep["slices"]["systems"]["tuned"]["slices"] if r["by"] == "field:region"} \
        == {"north", "south"}
    assert rep["examples"][0]["meta"]["region"] in ("north", "south")
    p = rep["probes"]
    assert p["sampled"] == 10 and p["variants"] >= 1 and "gender" in p["by_category"]
    f = rep["forgetting"]
    assert f["applies"] and f["text"]["passages"] > 0 and f["questions"]["n"] == len(general_questions())
    # three LoRA steps barely move the backbone: the general text's perplexity is close to the base's
    assert abs(f["text"]["relative_change"]) < 0.5
    html = (run_dir / "report.html").read_text()
    assert "<h2>Slices</h2>" in html and "Counterfactual bias probes" in html and "<h2>Forgetting</h2>" in html
    assert html.count('alt="slice gaps of') == 2
