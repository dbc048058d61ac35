"""The fast eval paths give the results of the plain ones: the few-shot prompt's shared prefix read once,
and forgetting's log-probabilities projected only where they are scored."""

import pytest
import torch

from tuneloop.eval.forgetting import causal_logits, general_passages, general_questions, general_scores, span_logprobs
from tuneloop.eval.predict import MIN_SHARED_PREFIX, predict_zero_shot, shared_prefix, zero_shot_prompts

TEXTS = ["the tea was lovely and fresh", "awful", "the jam arrived broken and the soup was bland, never again",
         "fine", "a perfect gift for my mother, she loved every bite of it"]
SHOTS = [("the soup was rotten", "no"), ("the jam was great, would buy again", "yes"), ("stale", "no")]
PROMPT = "Classify the text.\n\nText: {text}\n\nAnswer with one word: {choices}."


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


def test_shared_prefix_leaves_each_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2 and shared_prefix([[7]]) == 0 and shared_prefix([]) == 0


@pytest.mark.parametrize("words", [["yes", "no"], ["positive review", "negative review"]])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fewshot_prefix_reuse_equals_reading_each_prompt_whole(lm, words, dtype, tol):
    model, tok = lm
    shots = [(t, words[0] if w == "yes" else words[1]) for t, w in SHOTS]
    prompts = zero_shot_prompts(tok, TEXTS, PROMPT, words, 64, "You are a careful rater.", shots)
    assert shared_prefix(prompts) >= MIN_SHARED_PREFIX + 40  # the shots are shared: the fast path runs
    labels = ["good", "bad"]
    kw = dict(show_progress=False, system="You are a careful rater.", shots=shots)
    fast = predict_zero_shot(model, tok, TEXTS, labels, words, PROMPT, 2, 64, dtype, **kw)
    slow = predict_zero_shot(model, tok, TEXTS, labels, words, PROMPT, 2, 64, dtype, reuse_prefix=False, **kw)
    assert fast.shape == (5, 2) and torch.allclose(fast, slow, atol=tol), (fast - slow).abs().max()
    # zero-shot prompts share their system turn and instruction: the same holds there
    z_fast = predict_zero_shot(model, tok, TEXTS, labels, words, PROMPT, 3, 64, dtype, show_progress=False)
    z_slow = predict_zero_shot(model, tok, TEXTS, labels, words, PROMPT, 3, 64, dtype, show_progress=False,
                               reuse_prefix=False)
    assert torch.allclose(z_fast, z_slow, atol=tol)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.slow
def test_forgetting_scores_only_the_needed_positions_with_the_old_results(lm, bf16):
    model, tok = lm
    dev = torch.device("cpu")
    seqs = [tok(p)["input_ids"][:40] for p in general_passages(3)] + [[1, 2, 3, 4, 5], [9, 8]]
    starts = [1, 1, 1, 3, 1]
    reader = causal_logits(model)
    full = lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # noqa: E731
    new = span_logprobs(reader, seqs, starts, tok.pad_token_id, 2, dev, bf16)
    old = span_logprobs(full, seqs, starts, tok.pad_token_id, 2, dev, bf16)
    assert [k for _, k in new] == [k for _, k in old] == [len(s) - st for s, st in zip(seqs, starts)]
    assert [v for v, _ in new] == pytest.approx([v for v, _ in old], rel=1e-4 if not bf16 else 2e-2)
    kw = {"passages": general_passages(2), "questions": general_questions()[:3]}
    a, b = general_scores(reader, tok, dev, **kw), general_scores(full, tok, dev, **kw)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5) and a["correct"] == b["correct"]
    assert a["margin"] == pytest.approx(b["margin"], abs=1e-5)


@pytest.mark.slow
def test_a_bf16_classifier_loads_its_head_unrounded_and_computes_it_in_fp32(tmp_path, tiny_llama_dir):
    import json

    from safetensors.torch import load_file

    from tuneloop.config import recipe_from_dict
    from tuneloop.infer.predict import predict_classifier
    from tuneloop.runs import load_for_inference
    from tuneloop.train import train_run

    rows = [{"t": f"the tea was {w}", "y": y} for w, y in (("great", "good"), ("awful", "bad"))] * 12
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict({
        "name": "tiny-bf16", "model": str(tiny_llama_dir),
        "data": {"train": str(tmp_path / "d.jsonl"), "test": str(tmp_path / "d.jsonl"), "text_field": "t",
                 "label_field": "y", "val_ratio": 0.0},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "max_length": 16, "precision": "bf16", "threads": 1}})
    run_dir, _ = train_run(recipe, tmp_path / "ws", show_progress=False)
    saved = {k: v for k, v in load_file(run_dir / "model" / "adapter_model.safetensors").items() if "score" in k}
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    loaded = load_for_inference(run_dir)
    heads = {n: p for n, p in loaded.model.named_parameters() if "score" in n and "modules_to_save" in n}
    assert heads and all(p.dtype == torch.float32 for p in heads.values())
    # the trained values as saved, not rounded to bf16
    assert torch.equal(next(iter(heads.values())).cpu(), next(iter(saved.values())))
    ids = loaded.tokenizer(["the tea was great"], return_tensors="pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = loaded.model(**ids).logits
    assert logits.dtype == torch.float32
    probs = predict_classifier(loaded.model, loaded.tokenizer, ["the tea was great", "awful"], 2, 16, loaded.dtype,
                               show_progress=False)
    assert torch.allclose(probs.sum(-1), torch.ones(2))


def test_progress_lines_every_few_seconds_with_rate_and_eta():
    from tuneloop.data.progress import ProgressLines

    now = [0.0]
    out: list[str] = []
    lines = ProgressLines("eval base_fewshot", 100, every=5.0, print_fn=out.append, clock=lambda: now[0])
    for _ in range(10):  # 10 records every 2 s
        now[0] += 2.0
        lines.advance(10)
    assert len(out) == 4  # at 6, 12 and 18 s (5 s or more apart), and a closing line
    assert out[0] == "eval base_fewshot: 30/100 records · 5.0/s · elapsed 6 s · ETA 14 s"
    assert out[-1].endswith("done") and "100/100" in out[-1]
    quick = ProgressLines("fast", 10, every=5.0, print_fn=out.append, clock=lambda: now[0])
    quick.advance(10)
    assert len(out) == 4  # a stage shorter than the interval prints nothing


def test_predictions_print_progress_lines_where_no_bar_is_drawn(lm, capsys, monkeypatch):
    import tuneloop.data.progress as progress

    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    model, tok = lm
    predict_zero_shot(model, tok, TEXTS, ["good", "bad"], ["yes", "no"], PROMPT, 2, 64, torch.float32,
                      show_progress=False, desc="eval base")
    err = capsys.readouterr().err
    assert "eval base: 2/5 records" in err and "eval base: 5/5 records" in err and "ETA" in err


def test_the_bf16_inference_layout_casts_norm_outputs_once_with_the_same_logits(tiny_llama_dir):
    from transformers import AutoModelForSequenceClassification

    from tuneloop.infer.attention import bf16_matmuls

    def build():
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2, dtype=torch.float32)
        m.config.pad_token_id = 0
        return m.eval()

    ids = torch.randint(1, 1000, (3, 12))
    hooked, plain = build(), build()
    assert bf16_matmuls(hooked) == 2 * 7  # the blocks' Linears; the head stays fp32
    for m in plain.modules():  # the same weights, autocast left to cast each Linear's input itself
        if isinstance(m, torch.nn.Linear) and m is not plain.score:
            m.to(torch.bfloat16)
    assert hooked.score.weight.dtype == torch.float32 and hooked.model.norm.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = hooked(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(a, b)
    with torch.no_grad():  # without autocast the hooks stay out of the way (fp32 products of fp32 inputs)
        assert hooked.model.layers[0].input_layernorm(torch.ones(1, 2, 32)).dtype == torch.float32
