"""Summaries: the ACLSum data set read from its package, long prompts cut the same way in training and
evaluation, the extractive baselines, and ROUGE-1/2/L side by side. Tiny models from a config."""

from __future__ import annotations

import json

import pytest

from tuneloop.config import recipe_from_dict
from tuneloop.data.chat import load_chat
from tuneloop.errors import DataError, NotFoundError
from tuneloop.eval.extractive import document_of, lead, sentences, summarise, textrank


def test_aclsum_reads_three_aspects_per_paper_with_the_document_first():
    train = load_chat("dataset:aclsum/train")
    assert len(train) == 300 and {r.meta["aspect"] for r in train} == {"challenge", "approach", "outcome"}
    assert len({r.meta["paper"] for r in train}) == 100
    first = train[0]
    assert first.source == "dataset:aclsum/train:1"
    user, answer = first.messages[0]["content"], first.messages[1]["content"]
    assert user.rstrip().endswith("of this paper?") and len(user) > 2000 and 5 < len(answer.split()) < 80
    test_papers = {r.meta["paper"] for r in load_chat("dataset:aclsum/test")}
    assert not test_papers & {r.meta["paper"] for r in train}  # the package's splits do not share papers
    with pytest.raises(NotFoundError, match="known: aclsum"):
        load_chat("dataset:nosuch/train")
    with pytest.raises(DataError, match="unknown split"):
        load_chat("dataset:aclsum/dev")


DOC = ("Cats are small mammals . Cats hunt mice and cats sleep a lot . Dogs like cats sometimes . "
       "The weather was mild in May . Cats and dogs share homes with people who like cats .")


def test_sentences_lead_and_textrank():
    assert sentences("We use e.g. BERT here. Then Fig. 2 shows it! Done? Yes.") == [
        "We use e.g. BERT here.", "Then Fig. 2 shows it!", "Done?", "Yes."]
    assert lead(DOC, 2) == "Cats are small mammals . Cats hunt mice and cats sleep a lot ."
    # the most central sentence shares the most words with the others; the off-topic one is never picked
    top = textrank(DOC, 1)
    assert "cats" in top.lower() and "weather" not in top
    assert "weather" not in textrank(DOC, 3)
    assert textrank("One sentence only.", 2) == "One sentence only."


def test_the_extractive_systems_summarise_the_document_not_the_instruction():
    turn = f"Title of it\n\n{DOC}\n\nIn one sentence, what is the outcome of this paper?"
    assert document_of(turn) == DOC
    assert summarise("lead", turn) == "Cats are small mammals ."
    with pytest.raises(Exception, match="known: lead, textrank"):
        summarise("abstractive", turn)


def test_fit_prompt_cuts_the_document_and_keeps_the_instruction(smol_dir):
    from tuneloop.infer.encode import encode_chat, fit_prompt, load_tokenizer

    tok = load_tokenizer(str(smol_dir), chat=True)
    doc = " ".join(f"Sentence number {i} says something." for i in range(200))
    msgs = [{"role": "user", "content": f"{doc}\n\nSummarise it."}, {"role": "assistant", "content": "It counts."}]
    for how in ("end", "middle"):
        fitted, cut = fit_prompt(tok, msgs, 128, 32, how)
        ids, labels = encode_chat(tok, fitted)
        prompt_len = next(i for i, l in enumerate(labels) if l != -100)
        assert cut > 0 and prompt_len <= 128 - 32 and len(ids) <= 128
        user = fitted[0]["content"]
        assert user.endswith("Summarise it.") and user.startswith("Sentence number 0")
        assert ("number 199" in user) == (how == "middle")
        assert fitted[1] == msgs[1] and msgs[0]["content"].startswith(doc)  # the input is not changed
    same, cut = fit_prompt(tok, [{"role": "user", "content": "Short."}, {"role": "assistant", "content": "Yes."}],
                           128, 32, "end")
    assert cut == 0 and same[0]["content"] == "Short."


def _long_docs(path, n, seed):
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            topic = rng.choice(["rain", "sun", "snow"])
            body = " ".join(f"The {topic} was heavy on day {d} ." for d in range(40))
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{body}\n\nIn one sentence, what was the weather?"},
                {"role": "assistant", "content": f"There was {topic} ."}]}) + "\n")
    return str(path)


@pytest.mark.slow
def test_summaries_end_to_end_with_rouge_and_extractive_baselines(tiny_llama_dir, tmp_path):
    from tuneloop.eval.textgen import evaluate_sft
    from tuneloop.train import train_run

    recipe = recipe_from_dict({
        "name": "tiny-summaries", "task": "sft", "model": str(tiny_llama_dir),
        "data": {"train": _long_docs(tmp_path / "train.jsonl", 24, 0), "test": _long_docs(tmp_path / "test.jsonl", 6, 1),
                 "val_ratio": 0.0, "answer_room": 16, "truncate": "middle"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "threads": 1, "max_length": 96},
        "eval": {"systems": ["base", "tuned", "lead", "textrank"], "max_new_tokens": 8, "forgetting": False,
                 "probe_sample": 0},
    })
    run_dir, m = train_run(recipe, tmp_path / "ws", show_progress=False)
    assert m["prompts_cut"] == 24 and m["prompt_tokens_cut"] > 0 and m["dropped_records"] == 0
    report = evaluate_sft(run_dir, show_progress=False)
    assert set(report["systems"]) == {"base", "tuned", "lead", "textrank"}
    for name, s in report["systems"].items():
        assert 0 <= s["rouge2"] <= s["rouge1"] <= 1 and 0 <= s["rougeL"] <= 1, name
    assert report["systems"]["lead"]["perplexity"] is None and report["systems"]["tuned"]["perplexity"] > 1
    assert any("6 of 6 test prompts cut" in n for n in report["notes"])
    assert {"rouge1", "rouge2", "rougeL"} <= set(report["intervals"]["lead"])
    gens = [json.loads(l) for l in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert all(g["lead"].startswith("The ") for g in gens)
