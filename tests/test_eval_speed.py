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
