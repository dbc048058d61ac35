"""Preference training (dpo, kto, reward) on a tiny Llama built from a config: DPO starts at log 2 (the
reference is the policy with its fresh adapter off) and its loss falls; KTO starts at 1/2 and falls; a
reward model ranks held-out chosen answers above rejected ones; every loss equals TRL's on the same model
and tokens; and a run started from an sft run merges that run's adapter first."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError
from tuneloop.runs import HISTORY, load_for_inference, open_run
from tuneloop.train import train_run

FAST = {"batch_size": 8, "lr": 2e-2, "precision": "fp32", "threads": 1, "max_length": 96, "warmup_ratio": 0.0}
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Questions whose chosen answer is polite and right, the rejected one rude: separable by a word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.choice(COLOURS)
        out.append({"prompt": f"What colour is box {i}?", "chosen": f"Box {i} is {c}, thank you.",
                    "rejected": f"No idea, go away {c}.", "margin": float(i % 3)})
    return out


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(task: str, data: dict, model, **train) -> object:
    return recipe_from_dict({"name": f"pref-{task}", "task": task, "model": str(model), "data": data,
                             "method": LORA, "train": {**FAST, **train}})


@pytest.mark.slow
def test_dpo_starts_at_log2_and_its_loss_falls(tmp_path, tiny_llama_dir):
    data = {"train": write(tmp_path / "p.jsonl", pairs(40)), "val_ratio": 0.2, "test_ratio": 0.1}
    run_dir, m = train_run(recipe("dpo", data, tiny_llama_dir, max_steps=12), tmp_path / "ws", show_progress=False)
    hist = json.loads((run_dir / HISTORY).read_text())["train"]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(h["loss"] for h in hist[-3:]) / 3 < 0.8 * math.log(2), [h["loss"] for h in hist]
    assert m["val_reward_accuracy"] >= 0.8
    run = open_run(run_dir)
    assert run.info.task == "dpo" and run.info.parent_run is None and run.info.merged_adapters == []
    assert len((run_dir / "test.jsonl").read_text().splitlines()) == 4
    # the run loads for inference and its implicit reward prefers the held-out chosen answers
    from tuneloop.data.validate import read_records
    from tuneloop.infer.preference import sequence_logps

    loaded = load_for_inference(run)
    test = read_records(str(run_dir / "test.jsonl")).records
    prompts = [r.prompt for r in test]
    pc, nc = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.chosen for r in test], 4)
    pr, _ = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.rejected for r in test], 4)
    with loaded.model.disable_adapter():
        rc, _ = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.chosen for r in test], 4)
        rr, _ = sequence_logps(loaded.model, loaded.tokenizer, prompts, [r.rejected for r in test], 4)
    assert all(n > 3 for n in nc)
    assert sum((a - b) > (c - d) for a, b, c, d in zip(pc, rc, pr, rr)) >= 3


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust"])
@pytest.mark.slow
def test_dpo_variants_train(tmp_path, tiny_llama_dir, loss_type):
    data = {"train": write(tmp_path / "p.jsonl", pairs(24)), "val_ratio": 0.0}
    extra = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    _, m = train_run(recipe("dpo", data, tiny_llama_dir, max_steps=6, loss_type=loss_type, **extra), tmp_path / "ws",
                     show_progress=False)
    assert m["final_loss"] < m["first_loss"]


@pytest.mark.slow
def test_kto_starts_at_one_half_and_falls_on_thumbs(tmp_path, tiny_llama_dir):
    rows = []
    for p in pairs(40):
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": "undesirable"})
    data = {"train": write(tmp_path / "k.jsonl", rows), "val_ratio": 0.2}
    run_dir, m = train_run(recipe("kto", data, tiny_llama_dir, max_steps=12, beta=0.5), tmp_path / "ws",
                           show_progress=False)
    assert m["first_loss"] == pytest.approx(0.5, abs=1e-6)
    # validation batches mix both kinds; a length-bucketed training batch can hold one kind only (here the
    # rude answers are the short ones), and then z cancels r and its loss stays near 1/2
    assert m["best_val_loss"] < 0.35 and m["val_reward_accuracy"] >= 0.7
    assert open_run(run_dir).info.task == "kto"


@pytest.mark.slow
def test_reward_model_ranks_chosen_above_rejected(tmp_path, tiny_llama_dir):
    data = {"train": write(tmp_path / "p.jsonl", pairs(48)), "val_ratio": 0.0, "test_ratio": 0.25}
    run_dir, m = train_run(recipe("reward", data, tiny_llama_dir, max_steps=15), tmp_path / "ws", show_progress=False)
    assert m["final_loss"] < m["first_loss"]
    from tuneloop.data.validate import read_records
    from tuneloop.infer.preference import reward_scores

    loaded = load_for_inference(run_dir)
    test = read_records(str(run_dir / "test.jsonl")).records
    prompts = [r.prompt for r in test]
    good = reward_scores(loaded.model, loaded.tokenizer, prompts, [r.chosen for r in test], 8)
    bad = reward_scores(loaded.model, loaded.tokenizer, prompts, [r.rejected for r in test], 8)
    assert len(test) == 12 and sum(g > b for g, b in zip(good, bad)) >= 11


@pytest.mark.slow
def test_dpo_from_an_sft_run_merges_its_adapter_and_refuses_full(tmp_path, tiny_llama_dir):
    sft = tmp_path / "sft.jsonl"
    write(sft, [{"instruction": p["prompt"], "input": "", "output": p["chosen"]} for p in pairs(16)])
    ws = tmp_path / "ws"
    sft_dir, _ = train_run(recipe_from_dict({"name": "sft", "task": "sft", "model": str(tiny_llama_dir),
                                             "data": {"train": str(sft), "val_ratio": 0.0}, "method": LORA,
                                             "train": {**FAST, "max_steps": 3}}), ws, show_progress=False)
    data = {"train": write(tmp_path / "p.jsonl", pairs(16)), "val_ratio": 0.0}
    run_dir, m = train_run(recipe("dpo", data, sft_dir.name, max_steps=2), ws, show_progress=False)
    info = open_run(run_dir).info
    assert info.parent_run == str(sft_dir) and info.merged_adapters == [str(sft_dir / "model")]
    assert info.model_path == str(tiny_llama_dir)
    # at step 0 the reference is the sft model, so the loss is log 2 again
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # loading it puts the sft adapter into the base first: with the dpo adapter off, it is the sft model
    from tuneloop.infer.preference import sequence_logps

    dpo = load_for_inference(run_dir)
    sft_model = load_for_inference(sft_dir)
    args = (["What colour is box 1?"], ["Box 1 is red, thank you."], 1)
    with dpo.model.disable_adapter():
        a, _ = sequence_logps(dpo.model, dpo.tokenizer, *args)
    b, _ = sequence_logps(sft_model.model, sft_model.tokenizer, *args)
    assert a[0] == pytest.approx(b[0], abs=1e-4)
    # the server shares one base between adapters: a run trained on a merged parent is refused, saying why
    from tuneloop.serve.engine import read_run_info

    with pytest.raises(ConfigError, match="cannot serve it"):
        read_run_info(run_dir)
    with pytest.raises(ConfigError, match="dpo needs an adapter method"):
        train_run(recipe_from_dict({"name": "f", "task": "dpo", "model": str(tiny_llama_dir), "data": data,
                                    "method": {"name": "full"}, "train": FAST}), ws, show_progress=False)
    with pytest.raises(ConfigError, match="train.loss_type: not used by task kto"):
        recipe("kto", data, tiny_llama_dir, loss_type="ipo")


# ----------------------------------------------------------------------------------------------------
# parity with TRL: its trainers' loss on the same model (a LoRA adapter made non-zero) and the same tokens


def _trl_model(tiny_llama_dir, trainer_cls, config_cls, rows: list[dict], **config):
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    args = config_cls(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=2, **config)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return trainer, tok


def _pair_batch(tok, recs):
    from tuneloop.infer.encode import IGNORE
    from tuneloop.train.preference import encode_pairs, seqs

    rows, _, _ = encode_pairs(tok, recs, 96)
    batch = seqs([(r[0], r[1]) for r in rows] + [(r[2], r[3]) for r in rows], tok.pad_token_id, torch.device("cpu"))
    return rows, batch, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                         "completion_mask": (batch["labels"] != IGNORE).long()}


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
@pytest.mark.slow
def test_dpo_loss_equals_trls(tiny_llama_dir, loss_type, smoothing):
    from trl import DPOConfig, DPOTrainer

    from tuneloop.data.records import Record
    from tuneloop.train.dpo import dpo_losses, pair_scores
    from tuneloop.train.preference import Scorer

    trainer, tok = _trl_model(tiny_llama_dir, DPOTrainer, DPOConfig, [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2,
                              beta=0.3, loss_type=[loss_type], label_smoothing=smoothing)
    recs = [Record(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"]) for p in pairs(4)]
    rows, _, inputs = _pair_batch(tok, recs)
    model = trainer.model
    with torch.no_grad():
        theirs = float(trainer._compute_loss(model, inputs, False))
        from tuneloop.infer.logprobs import FinalHidden

        base = model.get_base_model()
        hidden = FinalHidden(base)
        c, r, rc, rr, nc, nr = pair_scores(model, model, Scorer(hidden, base.get_output_embeddings().weight), rows,
                                           list(range(len(rows))), tok.pad_token_id, torch.device("cpu"))
        hidden.handle.remove()
        ours = float(dpo_losses(c, r, rc, rr, 0.3, loss_type, smoothing, nc, nr).mean())
    assert abs(float((c - rc).abs().max())) > 1e-2  # the adapter does change the log-probs
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_kto_loss_equals_trls(tiny_llama_dir):
    from trl import KTOConfig, KTOTrainer

    from tuneloop.data.records import Record
    from tuneloop.infer.encode import IGNORE
    from tuneloop.infer.logprobs import FinalHidden
    from tuneloop.train.kto import kto_batch
    from tuneloop.train.preference import Scorer, encode_answers, seqs

    data = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}]
    trainer, tok = _trl_model(tiny_llama_dir, KTOTrainer, KTOConfig, data, beta=0.4, desirable_weight=1.3,
                              undesirable_weight=0.7)
    recs = [Record(prompt=p["prompt"], completion=a, label=lab) for p in pairs(3)
            for a, lab in ((p["chosen"], "desirable"), (p["rejected"], "undesirable"))]
    enc, _ = encode_answers(tok, recs, [r.completion for r in recs], 96)
    rows = [(e[0], e[1], r.label == "desirable") for r, e in zip(recs, enc)]
    idx = list(range(len(rows)))
    dev = torch.device("cpu")
    # TRL's mismatched pairs: prompt i with the answer of i - 1, as kto.kl_estimate builds them
    kl_enc, _ = encode_answers(tok, recs, [recs[i - 1].completion for i in idx], 96)
    main, kl = seqs([(e[0], e[1]) for e in enc], tok.pad_token_id, dev), seqs(kl_enc, tok.pad_token_id, dev)
    inputs = {"input_ids": main["input_ids"], "attention_mask": main["attention_mask"],
              "completion_mask": (main["labels"] != IGNORE).long(), "KL_input_ids": kl["input_ids"],
              "KL_attention_mask": kl["attention_mask"], "KL_completion_mask": (kl["labels"] != IGNORE).long(),
              "label": torch.tensor([r[2] for r in rows])}
    model = trainer.model
    with torch.no_grad():
        theirs = trainer._compute_loss(model, inputs, False)
        theirs = float(theirs[0] if isinstance(theirs, tuple) else theirs)
        base = model.get_base_model()
        hidden = FinalHidden(base)
        tc = type("TC", (), {"beta": 0.4, "desirable_weight": 1.3, "undesirable_weight": 0.7})
        losses, rewards, _ = kto_batch(model, model, Scorer(hidden, base.get_output_embeddings().weight), tok, recs,
                                       rows, idx, idx, 96, dev, tc)
        hidden.handle.remove()
    assert float(rewards.abs().max()) > 1e-2
    assert float(losses.mean()) == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_reward_loss_equals_trls(tiny_llama_dir):
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tuneloop.data.records import Record
    from tuneloop.train.preference import encode_pairs
    from tuneloop.train.reward import bradley_terry, pair_rewards

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True,
                                                           bf16=False, per_device_train_batch_size=2),
                            train_dataset=Dataset.from_list([{"chosen": "a", "rejected": "b"}] * 2),
                            processing_class=tok,
                            peft_config=LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0))
    recs = [Record(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"], margin=p["margin"]) for p in pairs(4)]
    rows, _, _ = encode_pairs(tok, recs, 96)
    from tuneloop.infer.batching import pad_batch

    ids, mask = pad_batch([r[0] for r in rows] + [r[2] for r in rows], tok.pad_token_id)
    margin = torch.tensor([r.margin for r in recs])
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, {"input_ids": ids, "attention_mask": mask, "margin": margin}))
        rc, rr = pair_rewards(trainer.model, rows, list(range(len(rows))), tok.pad_token_id, torch.device("cpu"))
    assert float((rc - rr).abs().max()) > 1e-3
    assert float(bradley_terry(rc, rr, margin).mean()) == pytest.approx(theirs, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# a pair as one row [prompt | chosen | rejected]: the same log-probs and gradients as two sequences


@pytest.mark.parametrize("impl,dtype,tol,grad_tol", [("sdpa", torch.float32, 1e-5, 1e-5),
                                                     ("eager", torch.float32, 1e-5, 1e-5),
                                                     ("tuneloop_cpu", torch.bfloat16, 1e-3, 1e-2)])
def test_pair_rows_equal_separate_sequences(tiny_llama_dir, impl, dtype, tol, grad_tol):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.data.records import Record
    from tuneloop.infer.attention import register_attention
    from tuneloop.infer.logprobs import FinalHidden
    from tuneloop.infer.attention import as_attention_mask
    from tuneloop.infer.preference import PAD, collate_pair_rows, pair_logps, pair_mask_for, pair_row
    from tuneloop.train.dpo import dpo_losses, pair_scores
    from tuneloop.train.preference import Scorer, encode_pairs

    if impl == "tuneloop_cpu":
        register_attention()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype, attn_implementation=impl)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    # answers of different lengths (pads in the batch), and a pair whose answers start alike
    recs = [Record(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"] * (1 + i % 3))
            for i, p in enumerate(pairs(5))]
    recs.append(Record(prompt="What colour is box 9?", chosen="Box 9 is red.", rejected="Box 9 is blue, sorry."))
    rows, _, _ = encode_pairs(tok, recs, 96)
    idx = list(range(len(rows)))
    row = pair_row(*rows[0])
    assert len(row[0]) < len(rows[0][0]) + len(rows[0][2]) - 10  # the prompt is there once
    assert (collate_pair_rows([pair_row(*r) for r in rows], tok.pad_token_id)["segments"] == PAD).any()

    scorer = Scorer(FinalHidden(base), base.get_output_embeddings().weight)
    seen = []
    attn = base.model.layers[0].self_attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for shared in (True, False):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            scores = pair_scores(model, model, scorer, rows, idx, tok.pad_token_id, torch.device("cpu"), shared)
            loss = dpo_losses(*scores[:4], 0.3, "sigmoid", 0.0).sum()
        out[shared] = [s.detach() for s in scores], torch.autograd.grad(loss, trainable)
        if shared:  # the tree mask reaches the attention layer as it was built: transformers passes it through
            segments = collate_pair_rows([pair_row(*r) for r in rows], tok.pad_token_id)["segments"]
            assert torch.equal(seen[0], pair_mask_for(model, segments, dtype))
    hook.remove()
    scorer.hidden.handle.remove()
    (ours, g_ours), (theirs, g_theirs) = out[True], out[False]
    assert float((theirs[0] - theirs[2]).abs().max()) > 1e-2  # the adapter does change the log-probs
    for a, b in zip(ours[4:], theirs[4:]):
        assert torch.equal(a, b)  # the same answer tokens counted
    # summed log-probs are ~ -10 per token here (a random model over 49k tokens): compared per answer token
    for k, (a, b) in enumerate(zip(ours[:4], theirs[:4])):
        n = ours[4 + k % 2]
        torch.testing.assert_close(a / n, b / n, rtol=0, atol=tol)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol * float(b.abs().max()))
    # the check can fail: a plain causal mask over the row lets the rejected answer see the chosen one
    batch = collate_pair_rows([pair_row(*r) for r in rows], tok.pad_token_id)
    t = batch["input_ids"].shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril().expand(len(rows), 1, t, t)
    scorer = Scorer(FinalHidden(base), base.get_output_embeddings().weight)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        _, leaked, _, _ = pair_logps(model, batch, scorer.hidden, scorer.out_weight,
                                     as_attention_mask(causal, impl, dtype))
    scorer.hidden.handle.remove()
    assert float(((leaked - theirs[1]) / ours[5]).abs().max()) > 5 * tol


def test_pair_row_keeps_each_sequence_and_its_positions():
    from tuneloop.infer.encode import IGNORE
    from tuneloop.infer.preference import CHOSEN, PROMPT, REJECTED, pair_row, tree_mask

    # prompt 1 2 3, answers starting with the same token 7 (it is not shared: it is an answer token)
    c_ids, c_lab = [1, 2, 3, 7, 8, 9], [IGNORE] * 3 + [7, 8, 9]
    r_ids, r_lab = [1, 2, 3, 7, 5], [IGNORE] * 3 + [7, 5]
    ids, lc, lr, pos, seg = pair_row(c_ids, c_lab, r_ids, r_lab)
    # two shared tokens: the last prompt token opens the rejected segment, which predicts its first answer token
    assert seg == [PROMPT] * 2 + [CHOSEN] * 4 + [REJECTED] * 3
    assert ids == [1, 2, 3, 7, 8, 9, 3, 7, 5] and pos == [0, 1, 2, 3, 4, 5, 2, 3, 4]
    assert lc == c_lab + [IGNORE] * 3 and lr == [IGNORE] * 6 + [IGNORE, 7, 5]
    allowed = tree_mask(torch.tensor([seg]))[0, 0]
    # each answer's tokens see exactly its own separate sequence's tokens
    for q in range(len(ids)):
        seen = [ids[k] for k in range(len(ids)) if allowed[q, k]]
        own = c_ids if seg[q] != REJECTED else r_ids
        assert seen == own[: pos[q] + 1]
