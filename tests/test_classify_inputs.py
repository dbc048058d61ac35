"""How a classify run reads its inputs: templates, chat wrapping, and a head that starts as the LM's answer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError
from tuneloop.train.classify import build_classifier, encode_texts


@pytest.fixture(scope="module")
def tok(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.mark.slow
def test_truncation_cuts_the_text_never_the_template(tok):
    text = " ".join(f"w{i}" for i in range(200))
    [ids] = encode_texts(tok, [text], 40, "Review: {text}\n\nGreat or other?")
    assert len(ids) == 40
    decoded = tok.decode(ids)
    assert decoded.startswith("Review: w0") and decoded.endswith("\n\nGreat or other?")


def test_middle_truncation_keeps_both_ends(tok):
    text = " ".join(f"w{i}" for i in range(200))
    [ids] = encode_texts(tok, [text], 40, "Review: {text}\n\nGreat or other?", truncate="middle")
    assert len(ids) == 40
    decoded = tok.decode(ids)
    assert decoded.startswith("Review: w0") and "w199\n\nGreat or other?" in decoded
    assert " w100 " not in decoded
    [short] = encode_texts(tok, ["tasty"], 40, "Review: {text}", truncate="middle")
    assert tok.decode(short) == "Review: tasty"


def test_as_chat_ends_where_the_assistant_answers(tok):
    [ids] = encode_texts(tok, ["tasty"], 64, "Is {text} good?", as_chat=True, system="Be brief.")
    decoded = tok.decode(ids)
    assert decoded == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs tasty good?<|im_end|>\n"
                       "<|im_start|>assistant\n")


def test_template_must_hold_text_once():
    with pytest.raises(ConfigError, match="input_template: must contain {text} exactly once"):
        recipe_from_dict({"name": "x", "data": {"train": "a.jsonl", "input_template": "no slot"}})


def test_label_words_head_equals_the_language_models_answer(tiny_llama_dir):
    """Before any training, the classifier's logits are the LM's next-token logits for the label words."""
    r = recipe_from_dict({"name": "x", "model": str(tiny_llama_dir), "data": {"train": "a.jsonl"},
                          "method": {"head_init": "label_words"}})
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    words = ["great", "other"]
    clf = build_classifier(str(tiny_llama_dir), ["great", "other"], r.method, torch.float32, tok.pad_token_id, words)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor(encode_texts(tok, ["the soup was fine"], 64, "{text} Great or other?", as_chat=True))
    with torch.no_grad():
        got = clf(input_ids=ids).logits[0]
        want = lm(input_ids=ids).logits[0, -1, [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_label_words_after_plain_text_take_the_spaced_token(tiny_llama_dir):
    """After "...Answer:" a byte-level BPE model writes " great", a different token from "great"."""
    r = recipe_from_dict({"name": "x", "model": str(tiny_llama_dir), "data": {"train": "a.jsonl"},
                          "method": {"head_init": "label_words"}})
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    words = ["great", "other"]
    spaced = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    bare = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    assert spaced != bare
    out = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).get_output_embeddings().weight
    after_text = build_classifier(str(tiny_llama_dir), words, r.method, torch.float32, tok.pad_token_id, words,
                                  prompt_end="{text}\nAnswer:")
    torch.testing.assert_close(after_text.score.weight.detach(), out[spaced].detach())
    after_newline = build_classifier(str(tiny_llama_dir), words, r.method, torch.float32, tok.pad_token_id, words,
                                     prompt_end="{text}\nAnswer:\n")
    torch.testing.assert_close(after_newline.score.weight.detach(), out[bare].detach())
