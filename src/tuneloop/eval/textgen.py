"""Generation metrics for SFT runs: perplexity on the reference answers, and ROUGE-L / BLEU of greedy
answers, side by side for the base model and the tuned one.

rouge-score and sacrebleu do the scoring (offline; never `evaluate.load`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..config import load_recipe
from ..data.chat import load_chat
from ..data.records import Record
from ..errors import DataError
from ..fileio import write_json_atomic, write_text_atomic
from ..train.common import device, pad_batch, progress_columns, set_threads, sorted_batches
from ..train.fastpath import attention_for, keep_adapter_inputs_bf16
from ..zoo import resolve_model

console = Console(stderr=True)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (with stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / max(1, len(scores))


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


@torch.no_grad()
def answer_perplexity(model, tok, conversations: list[list[dict]], max_length: int, batch_size: int, dev) -> float:
    """exp(mean NLL per answer token), answers masked exactly as in training."""
    from ..train.sft import IGNORE, collate, encode_chat

    rows = []
    for msgs in conversations:
        ids, labels = encode_chat(tok, msgs)
        rows.append((ids[:max_length], labels[:max_length], list(range(min(len(ids), max_length)))))
    nll, n = 0.0, 0
    for b in sorted_batches([len(r[0]) for r in rows], batch_size):
        batch = collate([rows[i] for i in b], tok.pad_token_id, packed=False)
        k = int((batch["labels"][:, 1:] != IGNORE).sum())
        if not k:
            continue
        out = model(**{key: v.to(dev) for key, v in batch.items()}, num_items_in_batch=1, use_cache=False)
        nll += float(out.loss)
        n += k
    return math.exp(nll / max(1, n))


@torch.no_grad()
def generate_answers(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, dev,
                     progress=None, label: str = "generate") -> list[str]:
    """Greedy answers to each prompt conversation (left-padded batches, longest first)."""
    enc = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    enc = [list(e["input_ids"]) if isinstance(e, dict) or hasattr(e, "keys") else list(e) for e in enc]
    out = [""] * len(enc)
    task = progress.add_task(label, total=len(enc), info="") if progress is not None else None
    for b in sorted_batches([len(e) for e in enc], batch_size):
        ids, mask = pad_batch([enc[i] for i in b], tok.pad_token_id, left=True)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for i, row in zip(b, gen[:, ids.shape[1]:].tolist()):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
        if task is not None:
            progress.update(task, advance=len(b))
    return out


def _test_records(run_dir: Path, recipe, test_path: str | None) -> list[Record]:
    if test_path:
        return load_chat(test_path)
    if recipe.data.test:
        return load_chat(recipe.data.test, recipe.data.format)
    f = run_dir / "test.jsonl"
    if not f.exists() or not f.read_text().strip():
        raise DataError(f"{run_dir}: no test records (set data.test or data.test_ratio, or pass --data)")
    return [Record(messages=json.loads(l)["messages"], source=f"{f}:{i}")
            for i, l in enumerate(f.read_text().splitlines(), start=1) if l.strip()]


def evaluate_sft(run_dir: Path, test_path: str | None = None, systems: list[str] | None = None,
                 out_dir: Path | None = None, show_progress: bool = True) -> dict:
    """Base vs tuned on the held-out conversations: perplexity, ROUGE-L, BLEU; writes report.json and
    generations.jsonl (every prompt with the reference and both answers)."""
    from transformers import AutoModelForCausalLM

    from ..train.sft import load_tokenizer

    recipe = load_recipe(run_dir / "recipe.yaml")
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    set_threads(recipe.train.threads)
    dev = device()
    ec = recipe.eval
    records = _test_records(run_dir, recipe, test_path)
    if ec.max_test_examples:
        records = records[: ec.max_test_examples]
    convs = [r.messages for r in records]
    prompts = [m[:-1] for m in convs]
    refs = [m[-1]["content"] for m in convs]
    model_path = metrics["model_path"] if Path(metrics["model_path"]).exists() else resolve_model(metrics["base_model"])
    tok = load_tokenizer(str(run_dir / "model") if (run_dir / "model" / "tokenizer_config.json").exists() else model_path)
    dtype = getattr(torch, metrics.get("dtype", "float32"))
    bf16 = dtype == torch.bfloat16
    load = {"dtype": dtype, "attn_implementation": attention_for(dev, dtype)}
    systems = systems or [s for s in ec.systems if s in ("base", "tuned")] or ["base", "tuned"]

    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    t0 = time.time()
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        model = None
        for name in ("base", "tuned"):
            if name not in systems:
                continue
            ts = time.time()
            if name == "base":
                model = AutoModelForCausalLM.from_pretrained(model_path, **load)
            elif (run_dir / "model" / "adapter_config.json").exists():
                from peft import PeftModel

                base = model if model is not None else AutoModelForCausalLM.from_pretrained(model_path, **load)
                model = PeftModel.from_pretrained(base, str(run_dir / "model"))
                if bf16:
                    keep_adapter_inputs_bf16(model)  # computed under bf16 autocast below
            else:
                model = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), **load)
            model = model.to(dev).eval()
            # bf16 autocast: fp32 adapters on a bf16 base compute in bf16, like in training
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                ppl = answer_perplexity(model, tok, convs, recipe.train.max_length, ec.batch_size, dev)
            merged = (name == "tuned" and ec.merge_adapters and hasattr(model, "merge_and_unload")
                      and recipe.method.name in ("lora", "dora"))
            if merged:
                # Outside autocast, so the update B @ A is formed in fp32 before it is added. Last
                # system, so the base weights can take it in place.
                model = model.merge_and_unload()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                gen = generate_answers(model, tok, prompts, ec.max_new_tokens, min(ec.batch_size, 16), dev,
                                       progress, f"{name}: generate")
            answers[name] = gen
            results[name] = {"perplexity": ppl, "rougeL": rouge_l(gen, refs), "bleu": bleu(gen, refs),
                             "merged_adapters": merged,
                             "mean_answer_words": sum(len(g.split()) for g in gen) / max(1, len(gen)),
                             "seconds": round(time.time() - ts, 1)}
    report = {"task": "sft", "run": str(run_dir), "n": len(records), "decoding": "greedy",
              "max_new_tokens": ec.max_new_tokens, "systems": results, "seconds": round(time.time() - t0, 1)}
    out_dir = Path(out_dir or run_dir)
    write_json_atomic(out_dir / "report.json", report)
    lines = [json.dumps({"prompt": p[-1]["content"], "reference": r, **{s: answers[s][i] for s in answers}},
                        ensure_ascii=False) for i, (p, r) in enumerate(zip(prompts, refs))]
    write_text_atomic(out_dir / "generations.jsonl", "\n".join(lines) + "\n")
    return report


def print_sft_table(report: dict, out: Console | None = None) -> None:
    t = Table(title=f"held-out answers (n={report['n']}, greedy, ≤{report['max_new_tokens']} new tokens)")
    for c in ("system", "perplexity ↓", "ROUGE-L ↑", "BLEU ↑", "words/answer"):
        t.add_column(c)
    for name, m in report["systems"].items():
        t.add_row(name, f"{m['perplexity']:.2f}", f"{m['rougeL']:.4f}", f"{m['bleu']:.2f}",
                  f"{m['mean_answer_words']:.0f}")
    (out or Console()).print(t)
