"""SFT recipe: answer mask on the real template, EOS, truncation, packing without cross-talk, methods,
early stopping, and the run-folder contract. Tiny models built from a config; offline; seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneloop.config import recipe_from_dict
from tuneloop.data.records import Record
from tuneloop.errors import ConfigError
from tuneloop.train import train_run
from tuneloop.train.common import ValWatch

IGNORE = -100


@pytest.fixture(scope="module")
def tok(smol_dir):
    from tuneloop.infer.encode import load_tokenizer

    return load_tokenizer(str(smol_dir))


def write_chat(path: Path, n: int = 48) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"What is {i} plus {i}?", "input": "",
                                "output": f"It is {2 * i}. " * (1 + i % 3)}) + "\n")
    return path


def train_direct(recipe, tmp_path):
    """The recipe function alone (no MLflow logging), which keeps these tests to seconds."""
    from tuneloop.train.sft import train_sft

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir, train_sft(recipe, run_dir, show_progress=False)


def sft_recipe(model_dir, data, **over) -> dict:
    doc = {
        "name": "tiny-sft", "task": "sft", "model": str(model_dir),
        "data": {"train": str(data), "test_ratio": 0.1, "val_ratio": 0.2},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "threads": 1,
                  "max_length": 96, "eval_every": 3},
    }
    for k, v in over.items():
        section, key = k.split("__")
        doc.setdefault(section, {})[key] = v
    return doc


# ----------------------------------------------------------------------------------------------------
# the answer mask, token by token, on SmolLM2's real chat template


def expected_mask(tok, ids: list[int]) -> list[bool]:
    """Independent reading of ChatML: after `<|im_start|>assistant\\n`, every token up to and including the
    next `<|im_end|>` is an answer token; everything else is not."""
    start = tok.convert_tokens_to_ids("<|im_start|>")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    mask, inside, j = [False] * len(ids), False, 0
    while j < len(ids):
        if not inside and ids[j] == start and ids[j + 1: j + 1 + len(header)] == header:
            inside = True
            j += 1 + len(header)
            continue
        if inside:
            mask[j] = True
            if ids[j] == end:
                inside = False
        j += 1
    return mask


def test_answer_mask_token_by_token(tok):
    from tuneloop.infer.encode import encode_chat

    msgs = [
        {"role": "system", "content": "You answer about Swedish building permits."},
        {"role": "user", "content": "Do I need a bygglov for a shed?"},
        {"role": "assistant", "content": "Usually not, if it is under 15 m² (attefall rules)."},
        {"role": "user", "content": "And for a balcony?"},
        {"role": "assistant", "content": "Yes: a balcony changes the facade, so it needs a permit."},
    ]
    ids, labels = encode_chat(tok, msgs)
    got = [l != IGNORE for l in labels]
    assert got == expected_mask(tok, ids)
    assert sum(got) > 10
    # labels equal the ids wherever they are set
    assert all(l == i for i, l in zip(ids, labels) if l != IGNORE)
    # the learned text is exactly the two answers, each closed by EOS
    spans, cur = [], []
    for i, m in zip(ids, got):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    assert [tok.decode(s) for s in spans] == [
        "Usually not, if it is under 15 m² (attefall rules).<|im_end|>",
        "Yes: a balcony changes the facade, so it needs a permit.<|im_end|>",
    ]
    assert all(s[-1] == tok.eos_token_id for s in spans)


def test_mask_with_default_system_prompt(tok):
    """No system message: the template inserts its default one, which is never learned."""
    from tuneloop.infer.encode import encode_chat

    ids, labels = encode_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    assert "SmolLM" in tok.decode(ids)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "Hello.<|im_end|>"


def test_truncation_counts_and_never_cuts_a_prompt(tok):
    from tuneloop.train.sft import encode_all

    long_answer = Record(messages=[{"role": "user", "content": "Q?"},
                                   {"role": "assistant", "content": "word " * 200}], source="f:1")
    long_system = Record(messages=[{"role": "system", "content": "rule " * 200}, {"role": "user", "content": "Q?"},
                                   {"role": "assistant", "content": "A."}], source="f:2")
    short = Record(messages=[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], source="f:3")
    out, report = encode_all(tok, [long_answer, long_system, short], max_length=64)
    assert report["truncated"] == 1 and report["dropped"] == 1 and report["dropped_examples"] == ["f:2"]
    assert len(out) == 2 and all(len(ids) <= 64 for ids, _ in out)
    ids, labels = out[0]
    assert labels[-1] != IGNORE  # cut inside the answer, the prompt intact


# ----------------------------------------------------------------------------------------------------
# packing: position ids restart per example and attention never crosses examples


def test_packing_matches_examples_alone(tok, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tuneloop.infer.encode import collate, encode_chat
    from tuneloop.train.sft import pack

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    convs = [[{"role": "user", "content": f"Question {i}?" * (i + 1)},
              {"role": "assistant", "content": f"Answer {i}." * (2 * i + 1)}] for i in range(3)]
    examples = [encode_chat(tok, c) for c in convs]
    rows = pack(examples, max_length=4096, seed=0)
    assert len(rows) == 1
    ids, labels, pos = rows[0]
    starts = [j for j, p in enumerate(pos) if p == 0]
    assert len(starts) == 3
    # no example's first token is a target of the one before it
    assert all(labels[s] == IGNORE for s in starts)
    batch = collate(rows + [rows[0][:1] and (ids[:20], labels[:20], pos[:20])], tok.pad_token_id, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                              use_cache=False).logits[0]
        bounds = starts + [len(ids)]
        for a, b in zip(bounds, bounds[1:]):
            alone = model(input_ids=torch.tensor([ids[a:b]])).logits[0]
            torch.testing.assert_close(packed_logits[a:b], alone, atol=1e-5, rtol=1e-4)
    # and the padded second row: the pad segment does not disturb the real tokens
    with torch.no_grad():
        row2 = model(input_ids=batch["input_ids"][1:], position_ids=batch["position_ids"][1:],
                     use_cache=False).logits[0, :20]
        torch.testing.assert_close(row2, packed_logits[:20], atol=1e-5, rtol=1e-4)


def test_packed_training_loss_equals_unpacked(tok, tiny_llama_dir):
    """The summed answer loss of a packed row equals the sum over the examples run one by one."""
    from transformers import AutoModelForCausalLM

    from tuneloop.infer.encode import collate, encode_chat
    from tuneloop.train.sft import pack

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    convs = [[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i} " * (i + 2)}]
             for i in range(4)]
    examples = [encode_chat(tok, c) for c in convs]
    packed = collate(pack(examples, 4096, 0), tok.pad_token_id, packed=True)
    with torch.no_grad():
        total = model(**packed, num_items_in_batch=1, use_cache=False).loss
        alone = sum(model(**collate([(i, l, list(range(len(i))))], tok.pad_token_id, packed=False),
                          num_items_in_batch=1, use_cache=False).loss for i, l in examples)
    torch.testing.assert_close(total, alone, atol=1e-3, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# training runs on the tiny model


@pytest.mark.slow
def test_sft_run_folder_and_loss_falls(tmp_path, tiny_llama_dir):
    data = write_chat(tmp_path / "chat.jsonl")
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, train__max_steps=12, train__packing=True,
                                         train__max_length=256))
    run_dir, m = train_run(recipe, tmp_path / "ws", show_progress=False)
    for f in ("recipe.yaml", "train_metrics.json", "data.json", "loss.png", "test.jsonl", "history.json"):
        assert (run_dir / f).exists(), f
    assert (run_dir / "model" / "adapter_config.json").exists()
    assert not (run_dir / "checkpoints").exists()
    assert m["task"] == "sft" and m["method"] == "lora" and m["dtype"] == "float32"
    assert m["model_path"] == str(tiny_llama_dir)
    hist = json.loads((run_dir / "history.json").read_text())
    vals = [v[2] for v in hist["validation"]]
    assert vals[-1] < vals[0]
    assert m["final_loss"] < m["first_loss"]


@pytest.mark.parametrize("method", ["lora", "dora", "prompt_tuning", "prefix_tuning", "full"])
@pytest.mark.slow
def test_methods_train_and_save(tmp_path, tiny_llama_dir, method):
    data = write_chat(tmp_path / "chat.jsonl", 16)
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, method__name=method, train__max_steps=3,
                                         data__val_ratio=0.0, method__num_virtual_tokens=4))
    run_dir, m = train_direct(recipe, tmp_path)
    saved = run_dir / "model"
    if method == "full":
        assert (saved / "config.json").exists() and not (saved / "adapter_config.json").exists()
        assert m["trainable_params"] == m["total_params"]
    else:
        cfg = json.loads((saved / "adapter_config.json").read_text())
        assert cfg["peft_type"] == {"lora": "LORA", "dora": "LORA", "prompt_tuning": "PROMPT_TUNING",
                                    "prefix_tuning": "PREFIX_TUNING"}[method]
        assert cfg.get("use_dora", False) == (method == "dora")
        assert m["trainable_params"] < m["total_params"]


def test_packing_refused_with_virtual_tokens(tmp_path, tiny_llama_dir):
    data = write_chat(tmp_path / "chat.jsonl", 8)
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, method__name="prompt_tuning", train__packing=True))
    with pytest.raises(ConfigError, match="packing"):
        train_direct(recipe, tmp_path)


def test_qlora_without_gpu_is_a_clear_error(tmp_path, tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the QLoRA path itself is tested in test_qlora_on_gpu")
    data = write_chat(tmp_path / "chat.jsonl", 8)
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, method__name="qlora"))
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        train_direct(recipe, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU (none here)")
def test_qlora_on_gpu(tmp_path, tiny_llama_dir):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the bitsandbytes package")
    data = write_chat(tmp_path / "chat.jsonl", 16)
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, method__name="qlora", train__max_steps=3,
                                         train__precision="bf16"))
    run_dir, m = train_direct(recipe, tmp_path)
    assert (run_dir / "model" / "adapter_config.json").exists() and m["method"] == "qlora"


# ----------------------------------------------------------------------------------------------------
# early stopping and the overfitting warning


def test_valwatch_patience_and_overfit():
    w = ValWatch(patience=2, window=3)
    assert w.update(1, 2.0, 1.0) == (True, False, False)
    assert w.update(2, 1.5, 1.1) == (False, False, False)
    improved, stop, overfit = w.update(3, 1.0, 1.2)
    assert (improved, stop, overfit) == (False, True, True)
    assert w.best == 1.0 and w.best_step == 1 and w.overfit_warned_at == 3


def test_early_stopping_keeps_best(tmp_path, tiny_llama_dir):
    """A learning rate far too high makes validation loss worse; patience 1 stops the run and the saved
    adapter is the best one, not the last."""
    data = write_chat(tmp_path / "chat.jsonl")
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, train__max_steps=40, train__lr=3.0,
                                         train__eval_every=2, train__patience=1, train__warmup_ratio=0.0))
    run_dir, m = train_direct(recipe, tmp_path)
    assert m["stopped_early"] and m["steps"] < 40
    hist = json.loads((run_dir / "history.json").read_text())["validation"]
    assert m["best_val_loss"] == min(v[2] for v in hist)
    assert hist[-1][2] >= m["best_val_loss"]


@pytest.mark.slow  # torch.compile of every block: minutes on 2 cores
def test_compiled_blocks_train_the_same(tmp_path, tiny_llama_dir):
    """`train.compile` changes speed, not the numbers: the loss history matches the eager run."""
    data = write_chat(tmp_path / "chat.jsonl", 16)
    hists = []
    for compiled in (False, True):
        recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, train__max_steps=2, data__val_ratio=0.0,
                                             train__compile=compiled, train__packing=True))
        (tmp_path / str(compiled)).mkdir()
        run_dir, m = train_direct(recipe, tmp_path / str(compiled))
        hists.append([h["loss"] for h in json.loads((run_dir / "history.json").read_text())["train"]])
    assert len(hists[0]) == 2
    assert hists[1] == pytest.approx(hists[0], rel=1e-4)


@pytest.mark.slow
def test_eval_generates_the_same_with_adapters_merged(tmp_path, tiny_llama_dir):
    """Merged adapters (the fast way to generate) answer exactly as the adapters do, in fp32."""
    from tuneloop.eval.textgen import evaluate_sft

    data = write_chat(tmp_path / "chat.jsonl")
    recipe = recipe_from_dict(sft_recipe(tiny_llama_dir, data, train__max_steps=6,
                                         eval__max_new_tokens=8, eval__max_test_examples=4))
    run_dir, _ = train_run(recipe, tmp_path / "ws", show_progress=False)
    merged = evaluate_sft(run_dir, out_dir=tmp_path / "a", show_progress=False)
    assert merged["systems"]["tuned"]["merged_adapters"] is True
    # the same run, generating through the adapters
    text = (run_dir / "recipe.yaml").read_text()
    (run_dir / "recipe.yaml").write_text(text.replace("merge_adapters: true", "merge_adapters: false"))
    exact = evaluate_sft(run_dir, out_dir=tmp_path / "b", show_progress=False)
    assert exact["systems"]["tuned"]["merged_adapters"] is False
    assert merged["systems"]["tuned"]["perplexity"] == pytest.approx(exact["systems"]["tuned"]["perplexity"])
    gens = [(tmp_path / d / "generations.jsonl").read_text() for d in "ab"]
    assert gens[0] == gens[1]
