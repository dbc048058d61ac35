"""`tuneloop data pairs`: the record's answer is `chosen`, a model's greedy answer `rejected`, built from the
training split of the SFT recipe only (no held-out prompt in the output), near-identical pairs dropped.
Tiny model built from a config; offline; seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_helpers import run_cli, write_jsonl
from tuneloop.config import recipe_from_dict
from tuneloop.data.validate import read_records


@pytest.fixture(scope="module")
def talky_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model with the embedding rows of blank and special tokens zeroed (it shares them with its
    output head), so its greedy answers are words rather than the newlines a random model settles on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.get_input_embeddings().weight[blank] = 0
    out = tmp_path_factory.mktemp("talky")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def faq_rows(n: int = 30) -> list[dict]:
    return [{"instruction": f"Question {i}: who signs permit number {i}?", "input": "",
             "output": f"The municipality signs permit {i} after review. " * (1 + i % 2)} for i in range(n)]


def sft_doc(model_dir, data: Path) -> dict:
    return {"name": "tiny-faq", "task": "sft", "model": str(model_dir),
            "data": {"train": str(data), "test_ratio": 0.2, "val_ratio": 0.1},
            "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
            "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32", "threads": 1, "max_length": 96,
                      "seed": 3}}


def prompts_of(path: Path) -> list[str]:
    return [json.loads(l)["prompt"] for l in path.read_text().splitlines() if l.strip()]


@pytest.mark.slow
def test_pairs_come_from_the_training_split_of_the_sft_run(tmp_path, talky_dir):
    """Split against a real sft run: every prompt of the pairs is one the run trained on (train + val), none is
    in the run's test.jsonl, and together with it they cover the file."""
    from tuneloop.train.sft import train_sft

    data = write_jsonl(tmp_path / "faq.jsonl", faq_rows())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train_sft(recipe_from_dict(sft_doc(talky_dir, data)), run_dir, show_progress=False)
    held = [json.loads(l)["messages"][0]["content"] for l in (run_dir / "test.jsonl").read_text().splitlines()]
    assert len(held) == 6

    out = tmp_path / "pairs.jsonl"
    code, text = run_cli("data", "pairs", "--rejected-from", talky_dir, "--recipe", run_dir, "-o", out,
                         "--max-new-tokens", "6", "--no-progress")
    assert code == 0, text
    assert "training split only" in text and "6 held-out" in text
    got = prompts_of(out)
    assert not set(got) & set(held)
    # nothing was near-identical here, so the pairs and the held-out questions are the whole file
    assert sorted(got + held) == sorted(r["instruction"] for r in faq_rows())
    assert "24 pairs from 24 train records" in text

    # the same split from the recipe file itself; --split test gives exactly the held-out questions
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(sft_doc(talky_dir, data)))
    test_out = tmp_path / "heldout.jsonl"
    code, text = run_cli("data", "pairs", "--rejected-from", talky_dir, "--recipe", recipe, "--split", "test",
                         "-o", test_out, "--max-new-tokens", "6", "--no-progress")
    assert code == 0, text
    assert "HELD-OUT" in text and set(prompts_of(test_out)) <= set(held)

    # the file passes the data studio's reader as the preference shape
    res = read_records(str(out))
    assert res.shape == "preference" and not res.problems and len(res.records) == len(got)
    assert all(r.chosen != r.rejected for r in res.records)


def test_a_changed_file_no_longer_matches_the_runs_split(tmp_path, talky_dir):
    from tuneloop.train.sft import train_sft

    data = write_jsonl(tmp_path / "faq.jsonl", faq_rows())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train_sft(recipe_from_dict(sft_doc(talky_dir, data)), run_dir, show_progress=False)
    write_jsonl(data, faq_rows(31))  # one more record moves the split
    code, text = run_cli("data", "pairs", "--rejected-from", talky_dir, "--recipe", run_dir,
                         "-o", tmp_path / "p.jsonl", "--no-progress")
    assert code == 1 and "leak" in text and not (tmp_path / "p.jsonl").exists()


def test_near_identical_pairs_are_dropped_and_counted(tmp_path, talky_dir):
    """Records whose own answer is what the model generates (greedy, deterministic) make no pair."""
    from transformers import AutoModelForCausalLM

    from tuneloop.data.chat import load_chat
    from tuneloop.infer.encode import load_tokenizer
    from tuneloop.infer.predict import generate_answers
    from tuneloop.pairs import build_pairs

    rows = faq_rows(8)
    model = AutoModelForCausalLM.from_pretrained(talky_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(str(talky_dir), chat=True)
    recs = load_chat(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    own = generate_answers(model, tok, [r.messages[:-1] for r in recs], 8, 4, torch.device("cpu"))
    for i in range(0, 8, 2):  # every other record answers exactly as the model does
        rows[i]["output"] = own[i]
    rows.append({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                   {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]})
    write_jsonl(tmp_path / "b.jsonl", rows[:8])
    recs = load_chat(str(tmp_path / "b.jsonl"))
    multi = load_chat(str(write_jsonl(tmp_path / "c.jsonl", rows[8:])))
    res = build_pairs(recs + multi, model, tok, torch.device("cpu"), max_new_tokens=8, batch_size=4,
                      show_progress=False)
    assert res.summary["dropped"] == {"near_identical": 4, "empty_answer": 0, "not_single_turn": 1}
    assert [p["prompt"] for p in res.pairs] == [rows[i]["instruction"] for i in range(1, 8, 2)]
    assert all(p["rejected"] == own[i] for p, i in zip(res.pairs, range(1, 8, 2)))


@pytest.mark.parametrize("args, message", [
    ((), "--test-ratio is needed"),
    (("--test-ratio", "0.1", "--split", "dev"), "--split: unknown split 'dev'"),
    (("--test-ratio", "0.1", "--max-similarity", "0"), "--max-similarity"),
])
def test_bad_options_are_one_line(tmp_path, talky_dir, args, message):
    data = write_jsonl(tmp_path / "faq.jsonl", faq_rows(5))
    code, text = run_cli("data", "pairs", data, "--rejected-from", talky_dir, "-o", tmp_path / "p.jsonl", *args)
    assert code == 2 and message in text and "Traceback" not in text
