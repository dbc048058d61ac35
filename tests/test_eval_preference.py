"""Evaluation of dpo / kto / reward runs: preference accuracy by the implicit reward (1.0 for a policy moved
toward the chosen answers, exactly 0.5 for an untouched one), label accuracy on held-out thumbs (the same
two cases), win rates by a separate reward run, task metrics, and a report that round-trips through the
one schema. Tiny models built from a config; offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data_helpers import run_cli, write_jsonl
from tuneloop.config import recipe_from_dict


def pair_rows(n: int, offset: int = 0) -> list[dict]:
    # chosen and rejected answers share no words, so moving toward one moves away from the other
    return [{"prompt": f"Who approves permit {i}?", "chosen": f"The city council approves permit {i}.",
             "rejected": "No idea, sorry, ask someone else."} for i in range(offset, offset + n)]


def thumb_rows(n: int, offset: int = 0) -> list[dict]:
    # every pair split into its two thumbs, as kto reads pairs: both labels on every prompt
    return [{"prompt": r["prompt"], "completion": a, "label": good} for r in pair_rows(n, offset)
            for a, good in ((r["chosen"], True), (r["rejected"], False))]


def _lora_policy(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def _margins(model, tok, rows):
    from tuneloop.eval.preference import implicit_margins
    from tuneloop.infer.preference import sequence_logps

    prompts = [r["prompt"] for r in rows]
    pc, _ = sequence_logps(model, tok, prompts, [r["chosen"] for r in rows], 4)
    pr, _ = sequence_logps(model, tok, prompts, [r["rejected"] for r in rows], 4)
    with model.disable_adapter():
        rc, _ = sequence_logps(model, tok, prompts, [r["chosen"] for r in rows], 4)
        rr, _ = sequence_logps(model, tok, prompts, [r["rejected"] for r in rows], 4)
    return implicit_margins(pc, pr, rc, rr)


def _rewards(model, tok, rows):
    from tuneloop.eval.preference import implicit_rewards
    from tuneloop.infer.preference import sequence_logps

    prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    policy, _ = sequence_logps(model, tok, prompts, answers, 4)
    with model.disable_adapter():
        ref, _ = sequence_logps(model, tok, prompts, answers, 4)
    return implicit_rewards(policy, ref)


def _shift_toward(policy, tok, prompts: list[str], answers: list[str]) -> None:
    """A few steps of likelihood on `answers`, from the reference."""
    from tuneloop.infer.encode import collate, encode_chat

    enc = [encode_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}])
           for p, a in zip(prompts, answers)]
    batch = collate([(i, l, list(range(len(i)))) for i, l in enc], tok.pad_token_id, packed=False)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(15):
        opt.zero_grad()
        policy(**batch).loss.backward()
        opt.step()
    policy.eval()


@pytest.mark.slow
def test_preference_accuracy_of_untouched_and_shifted_policies(tiny_llama_dir):
    from tuneloop.eval.preference import preference_accuracy
    from tuneloop.infer.encode import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir), chat=True)
    rows = pair_rows(8)
    policy = _lora_policy(tiny_llama_dir)
    # a fresh LoRA adds B @ A = 0: the policy is its reference, every margin is 0, ties count half
    untouched = _margins(policy, tok, rows)
    assert all(abs(m) < 1e-4 for m in untouched) and preference_accuracy([0.0] * 8) == 0.5
    # the policy shifted toward the chosen answers (a few steps of likelihood on them, from the reference)
    _shift_toward(policy, tok, [r["prompt"] for r in rows[:4]], [r["chosen"] for r in rows[:4]])
    shifted = _margins(policy, tok, rows)
    # pairs 4-7 were not trained on: the shift generalises to their answers too
    assert preference_accuracy(shifted) == 1.0 and min(shifted) > 0


@pytest.mark.slow
def test_label_accuracy_of_untouched_and_shifted_policies(tiny_llama_dir):
    from tuneloop.eval.preference import label_accuracy
    from tuneloop.infer.encode import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir), chat=True)
    rows = thumb_rows(8)
    good = [r["label"] for r in rows]
    policy = _lora_policy(tiny_llama_dir)
    # the untouched adapter is its reference: every reward is 0, and a tie is half right whatever the label
    untouched = _rewards(policy, tok, rows)
    assert untouched == [0.0] * 16 and label_accuracy(untouched, good) == 0.5
    # shifted toward the desirable answers of prompts 0-3: every desirable answer gains, every undesirable
    # one loses, on the prompts it never saw too
    _shift_toward(policy, tok, [r["prompt"] for r in rows[:8:2]], [r["completion"] for r in rows[:8:2]])
    shifted = _rewards(policy, tok, rows)
    assert label_accuracy(shifted, good) == 1.0
    assert min(r for r, g in zip(shifted, good) if g) > 0 > max(r for r, g in zip(shifted, good) if not g)
    # a policy shifted the wrong way round scores 0: the accuracy reads the label, not only the reward
    assert label_accuracy(shifted, [not g for g in good]) == 0.0


def test_rank_score_and_accuracy_count_ties_half():
    from tuneloop.eval.preference import implicit_margins, preference_accuracy, rank_score

    assert [rank_score(2, 1), rank_score(1, 1), rank_score(0, 1)] == [1.0, 0.5, 0.0]
    m = implicit_margins([-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-2.0, -2.0])
    assert m == pytest.approx([0.5, -2.0])
    assert preference_accuracy(m + [0.0]) == pytest.approx(0.5)
    from tuneloop.eval.preference import implicit_rewards, label_accuracy, label_agreement

    r = implicit_rewards([-1.0, -3.0, -2.0, -2.0], [-2.0, -2.0, -2.0, -1.0])
    assert r == [1.0, -1.0, 0.0, -1.0]
    assert label_agreement(r, [True, True, False, False]) == [1.0, 0.0, 0.5, 1.0]
    assert label_accuracy(r, [True, True, False, False]) == pytest.approx(2.5 / 4)


# ----------------------------------------------------------------------------------------------------
# end to end on tiny runs: sft → dpo from it, and a reward run as the judge


def _train(task_doc: dict, run_dir: Path) -> Path:
    from tuneloop.runs import start_run
    from tuneloop.train import RECIPES

    recipe = recipe_from_dict(task_doc)
    run_dir.mkdir(parents=True)
    start_run(run_dir, recipe)
    RECIPES[recipe.task](recipe, run_dir, False)
    return run_dir


def _common(model, data: Path, test: Path | None = None, **train) -> dict:
    return {"model": str(model), "data": {"train": str(data), **({"test": str(test)} if test else {}),
                                          "val_ratio": 0.0},
            "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "threads": 1, "max_length": 64,
                      "lr": 1e-2, **train}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("pref-runs")
    chat = write_jsonl(tmp / "chat.jsonl", [{"instruction": r["prompt"], "input": "", "output": r["chosen"]}
                                            for r in pair_rows(12)])
    train_pairs = write_jsonl(tmp / "pairs.jsonl", pair_rows(12))
    test_pairs = write_jsonl(tmp / "heldout.jsonl", pair_rows(6, offset=100))
    sft = _train({"name": "t-sft", "task": "sft", **_common(tiny_llama_dir, chat)}, tmp / "sft")
    judge = _train({"name": "t-judge", "task": "reward", **_common(tiny_llama_dir, train_pairs, test_pairs)},
                   tmp / "judge")
    dpo_doc = {"name": "t-dpo", "task": "dpo", **_common(sft, train_pairs, test_pairs)}
    dpo_doc["eval"] = {"max_new_tokens": 6, "batch_size": 4}
    dpo = _train(dpo_doc, tmp / "dpo")
    train_thumbs = write_jsonl(tmp / "thumbs.jsonl", thumb_rows(12))
    # 5 prompts: 10 thumbs, both labels on each prompt, so a prompt is answered once and scored twice
    test_thumbs = write_jsonl(tmp / "heldout-thumbs.jsonl", thumb_rows(5, offset=100))
    kto_doc = {"name": "t-kto", "task": "kto", **_common(sft, train_thumbs, test_thumbs)}
    kto_doc["eval"] = {"max_new_tokens": 6, "batch_size": 4}
    kto = _train(kto_doc, tmp / "kto")
    return {"sft": sft, "judge": judge, "dpo": dpo, "kto": kto, "test": test_pairs, "test_thumbs": test_thumbs}


@pytest.mark.slow
def test_dpo_report_has_every_system_and_round_trips(runs, tmp_path):
    from tuneloop.eval.schema import Report
    from tuneloop.eval.tasks import evaluate_run

    report = evaluate_run(runs["dpo"], out_dir=tmp_path, show_progress=False, judge=str(runs["judge"]))
    assert list(report["systems"]) == ["base", "parent", "tuned"]
    assert report["settings"]["reference"] == "parent"
    assert report["settings"]["parent_run"] == str(runs["sft"])
    s = report["systems"]
    assert s["parent"]["preference_accuracy"] is None  # the reference itself
    for name in ("base", "tuned"):
        assert 0.0 <= s[name]["preference_accuracy"] <= 1.0
        lo, hi = report["intervals"][name]["preference_accuracy"]
        assert lo <= s[name]["preference_accuracy"] <= hi
    assert s["tuned"]["win_rate_vs_parent"] is not None and s["parent"]["win_rate_vs_parent"] is None
    assert s["base"]["win_rate_vs_base"] is None and 0 <= s["tuned"]["win_rate_vs_base"] <= 1
    for m in s.values():
        assert 0 <= m["rougeL"] <= 1 and m["perplexity"] > 1
    # the report on disk is the report returned, and the schema reads it back unchanged
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert Report.model_validate(on_disk).model_dump(mode="json") == on_disk == report
    assert report["test"]["n"] == 6 and len(report["predictions"]["tuned"]) == 6
    gens = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 6 and {"base", "parent", "tuned", "reference"} <= set(json.loads(gens[0]))
    page = (tmp_path / "report.html").read_text()
    assert "preference accuracy" in page and "reference" in page and "win rate vs parent" in page
    # the tuned system's logp of chosen answers is what perplexity and preference both read
    tuned = report["predictions"]["tuned"]
    assert all(p["loss"] == pytest.approx(-p["logp_chosen"] / p["tokens"]) for p in tuned.values())


@pytest.mark.slow
def test_eval_cli_with_judge_and_without(runs, tmp_path):
    code, text = run_cli("eval", runs["dpo"], "--judge", runs["judge"], "--out", tmp_path / "a", "--no-progress",
                         "--systems", "parent,tuned")
    assert code == 0, text
    assert "pref acc" in text and "reference" in text
    assert max(len(line) for line in text.splitlines() if "│" in line or "reference" in line) <= 80
    code, text = run_cli("eval", runs["dpo"], "--out", tmp_path / "b", "--no-progress", "--systems", "tuned")
    assert code == 0, text
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["systems"]["tuned"]["win_rate_vs_parent"] is None
    assert any("no judge" in n for n in report["notes"])
    # a judge must be a reward run
    code, text = run_cli("eval", runs["dpo"], "--judge", runs["sft"], "--out", tmp_path / "c", "--no-progress")
    assert code == 2 and "reward run" in text


@pytest.mark.slow
def test_reward_report_and_the_length_baseline(runs, tmp_path):
    from tuneloop.eval.tasks import evaluate_run

    report = evaluate_run(runs["judge"], out_dir=tmp_path, show_progress=False)
    assert list(report["systems"]) == ["tuned", "base", "length"]
    rows = pair_rows(6, offset=100)
    from tuneloop.eval.preference import rank_score

    longer = sum(rank_score(len(r["chosen"].split()), len(r["rejected"].split())) for r in rows) / len(rows)
    assert report["systems"]["length"]["preference_accuracy"] == pytest.approx(longer)
    assert 0 <= report["systems"]["tuned"]["preference_accuracy"] <= 1
    assert (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_kto_report_on_held_out_thumbs(runs, tmp_path):
    import io

    from rich.console import Console

    from tuneloop.eval.preference import print_preference_table
    from tuneloop.eval.schema import Report
    from tuneloop.eval.tasks import evaluate_run

    report = evaluate_run(runs["kto"], out_dir=tmp_path, show_progress=False, judge=str(runs["judge"]))
    assert list(report["systems"]) == ["base", "parent", "tuned"] and report["settings"]["reference"] == "parent"
    assert report["headline"]["metric"] == "label_accuracy"
    assert report["test"]["n"] == 10 and report["settings"]["desirable"] == report["settings"]["undesirable"] == 5
    s, preds = report["systems"], report["predictions"]
    parent = s["parent"]
    assert parent["label_accuracy"] is None and parent["desirable_reward"] is None  # the reference itself
    assert "preference_accuracy" not in parent
    rows = thumb_rows(5, offset=100)
    for name in ("base", "tuned"):
        p = list(preds[name].values())
        # every number of the table is the mean of its answers' predictions
        assert s[name]["label_accuracy"] == pytest.approx(sum(x["label_agrees"] for x in p) / 10)
        assert s[name]["desirable_reward"] == pytest.approx(sum(x["reward"] for x in p if x["desirable"]) / 5)
        assert s[name]["undesirable_reward"] == pytest.approx(sum(x["reward"] for x in p if not x["desirable"]) / 5)
        assert [x["desirable"] for x in p] == [r["label"] for r in rows]
        for metric in ("label_accuracy", "desirable_reward", "undesirable_reward", "win_rate_vs_parent", "rougeL"):
            lo, hi = report["intervals"][name][metric]
            assert lo <= s[name][metric] <= hi, (name, metric)
    for name, m in s.items():
        p = list(preds[name].values())
        # rougeL and perplexity read the desirable answers only
        assert all((x["rougeL"] is None) == (not x["desirable"]) for x in p)
        assert m["rougeL"] == pytest.approx(sum(x["rougeL"] for x in p if x["desirable"]) / 5)
        nll = sum(x["loss"] * x["tokens"] for x in p if x["desirable"])
        assert m["perplexity"] == pytest.approx(math.exp(nll / sum(x["tokens"] for x in p if x["desirable"])))
        # both thumbs on a prompt get the one answer to it
        assert [x["text"] for x in p][::2] == [x["text"] for x in p][1::2]
    assert "parent" not in report["intervals"] or "label_accuracy" not in report["intervals"]["parent"]
    assert {t["metric"] for t in report["tests"]} >= {"label_accuracy", "desirable_reward", "rougeL"}
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert Report.model_validate(on_disk).model_dump(mode="json") == on_disk == report
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [g["label"] for g in gens] == ["desirable", "undesirable"] * 5
    assert {"prompt", "completion", "base", "parent", "tuned"} <= set(gens[0])
    page = (tmp_path / "report.html").read_text()
    assert "label accuracy" in page and "reward of desirable" in page and "held-out answers" in page
    assert "completion (undesirable)" in page and "preference accuracy" not in page
    out = io.StringIO()
    print_preference_table(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "label acc" in text and "reference" in text and "r+" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_kto_run_on_held_out_pairs_keeps_the_pair_report(runs, tmp_path):
    from tuneloop.eval.tasks import evaluate_run

    report = evaluate_run(runs["kto"], test_path=str(runs["test"]), systems=["parent", "tuned"], out_dir=tmp_path,
                          show_progress=False)
    assert report["headline"]["metric"] == "preference_accuracy" and report["test"]["n"] == 6
    assert 0 <= report["systems"]["tuned"]["preference_accuracy"] <= 1
    assert "label_accuracy" not in report["systems"]["tuned"]
