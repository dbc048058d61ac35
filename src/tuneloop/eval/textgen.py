"""Generation metrics for SFT runs: perplexity on the reference answers, and ROUGE-1/2/L and BLEU of
greedy answers, side by side for the base model, the tuned one and (for summaries) the classical
extractive baselines `lead` and `textrank` (extractive.py).

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

from ..data.chat import load_chat
from ..data.records import Record
from ..errors import ConfigError, DataError
from ..fileio import write_text_atomic
from ..infer.attention import attention_for
from ..infer.batching import progress_columns
from ..infer.device import device, set_threads
from ..infer.encode import fit_prompt, load_tokenizer
from ..infer.predict import answer_losses, generate_answers
from ..runs import GENERATIONS, TEST_RECORDS, Run, load_for_inference, open_run
from .cache import EvalCache, cache_summary, generative_base_parts, reused_note, say_reused, workspace_cache_dir
from .cost import BatchTimer, system_cost
from .extractive import SYSTEMS as EXTRACTIVE
from .extractive import summarise
from .forgetting import causal_logits, compare_general, general_scores, not_applicable
from .probes import load_lexicon, run_probes
from .report import print_tests, write_report
from .schema import Report, TestSet, headline, keyed, make_examples
from .slices import slice_report
from .stats import default_pairs, report_statistics

MODEL_SYSTEMS = ("base", "tuned")
SYSTEMS = MODEL_SYSTEMS + EXTRACTIVE

console = Console(stderr=True)


def rouge_each(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures per answer (Porter stemming, as the ROUGE papers score)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return [{k: v.fmeasure for k, v in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]


def rouge_l_each(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 (with stemming) of each prediction against its reference, in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (with stemming), in [0, 1]."""
    scores = rouge_l_each(predictions, references)
    return sum(scores) / max(1, len(scores))


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def _test_records(run_dir: Path, recipe, test_path: str | None) -> tuple[str, list[Record]]:
    if test_path:
        return test_path, load_chat(test_path)
    if recipe.data.test:
        return recipe.data.test, load_chat(recipe.data.test, recipe.data.format)
    f = run_dir / TEST_RECORDS
    if not f.exists() or not f.read_text().strip():
        raise DataError(f"{run_dir}: no test records (set data.test or data.test_ratio, or pass --data)")
    rows = [(i, json.loads(l)) for i, l in enumerate(f.read_text().splitlines(), start=1) if l.strip()]
    return str(f), [Record(messages=d["messages"], source=f"{f}:{i}",
                           meta={k: v for k, v in d.items() if k != "messages"}) for i, d in rows]


def evaluate_sft(run_dir: "Path | Run", test_path: str | None = None, systems: list[str] | None = None,
                 out_dir: Path | None = None, show_progress: bool = True, cache: bool = True) -> dict:
    """Base vs tuned on the held-out conversations: perplexity, ROUGE-L, BLEU; writes report.json and
    generations.jsonl (every prompt with the reference and both answers). `cache`: read the base model's
    answers and scores from the workspace's eval cache when nothing that determines them changed
    (eval/cache.py); False recomputes them (and stores the fresh ones)."""
    from transformers import AutoModelForCausalLM

    from ..data.records import fingerprint

    run = open_run(run_dir)
    recipe, run_dir = run.recipe, run.dir
    set_threads(recipe.train.threads)
    dev = device()
    ec = recipe.eval
    source, records = _test_records(run_dir, recipe, test_path)
    if ec.max_test_examples:
        records = records[: ec.max_test_examples]
    convs = [r.messages for r in records]
    documents = [m[:-1][-1]["content"] if len(m) > 1 else "" for m in convs]  # uncut, for the extractive systems
    model_path = run.base_model_path()
    tok = load_tokenizer(run.tokenizer_path(), chat=True)
    notes: list[str] = []
    if recipe.data.answer_room:
        # the prompts the tuned model was trained on: long documents cut the same way (data.answer_room)
        fitted = [fit_prompt(tok, m, recipe.train.max_length, recipe.data.answer_room, recipe.data.truncate)
                  for m in convs]
        convs = [m for m, _ in fitted]
        cut = [n for _, n in fitted if n]
        notes.append(f"{len(cut)} of {len(convs)} test prompts cut to {recipe.train.max_length - recipe.data.answer_room}"
                     f" tokens for the models (data.truncate: {recipe.data.truncate}; {sum(cut):,} tokens left out); "
                     f"lead and textrank read the whole documents")
    prompts = [m[:-1] for m in convs]
    refs = [m[-1]["content"] for m in convs]
    dtype = getattr(torch, run.info.dtype or "float32")
    bf16 = dtype == torch.bfloat16
    load = {"dtype": dtype, "attn_implementation": attention_for(dev, dtype)}
    systems = systems or [s for s in ec.systems if s in SYSTEMS] or list(SYSTEMS)
    for name in systems:
        if name not in SYSTEMS:
            raise ConfigError(f"unknown system {name!r} for sft (known: {', '.join(SYSTEMS)})")

    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    per_example: dict[str, list[dict]] = {}
    cost: dict[str, dict] = {}
    t0 = time.time()
    meta = [{f: r.meta.get(f) for f in ec.slices} for r in records]
    examples = make_examples([json.dumps(p, ensure_ascii=False) for p in prompts], refs, meta)
    lexicon = load_lexicon(recipe.resolve_path(ec.probe_terms) if ec.probe_terms else None)
    probes: dict = {}
    general: dict[str, dict] = {}
    store = EvalCache(workspace_cache_dir(run_dir), enabled=cache)
    used: dict[str, bool] = {}
    # everything the base system's losses, forgetting scores and greedy answers depend on (eval/cache.py)
    base_parts = generative_base_parts(
        run, run.tokenizer_path(), convs, max_length=recipe.train.max_length, batch_size=ec.batch_size,
        max_new_tokens=ec.max_new_tokens, forgetting=ec.forgetting, attention=load["attn_implementation"])
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        model = None
        for name in EXTRACTIVE:
            if name not in systems:
                continue
            ts = time.time()
            gen = [summarise(name, d, ec.extractive_sentences) for d in documents]
            answers[name] = gen
            each = rouge_each(gen, refs)
            results[name] = {"perplexity": None, **_rouge_means(each), "bleu": bleu(gen, refs),
                             "mean_answer_words": sum(len(g.split()) for g in gen) / max(1, len(gen)),
                             "seconds": round(time.time() - ts, 1)}
            per_example[name] = [{"text": g, **r, "loss": None, "tokens": 0} for g, r in zip(gen, each)]
        def score(name: str, model, before_generating=None) -> dict:
            """A model system's answer losses, forgetting scores and greedy answers; `before_generating(model)`
            runs after the scoring (the tuned system's probes, the merge) and returns the model to generate
            with. `seconds` is the system's own time: without probes and the forgetting check."""
            ts = time.time()
            # bf16 autocast: fp32 adapters on a bf16 base compute in bf16, like in training
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                losses = answer_losses(model, tok, convs, recipe.train.max_length, ec.batch_size, dev)
            tp = time.time()
            scores = general_scores(causal_logits(model), tok, dev, bf16=bf16) if ec.forgetting else None
            if before_generating is not None:
                model = before_generating(model)
            ts += time.time() - tp
            timer = BatchTimer()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                gen = generate_answers(model, tok, prompts, ec.max_new_tokens, min(ec.batch_size, 16), dev,
                                       progress, f"{name}: generate", timer=timer)
            return {"losses": [list(x) for x in losses], "general": scores, "text": gen,
                    "batches": timer.batches, "seconds": round(time.time() - ts, 1)}

        merged = False
        for name in MODEL_SYSTEMS:
            if name not in systems:
                continue
            if name == "base":
                def compute_base():
                    nonlocal model
                    model = AutoModelForCausalLM.from_pretrained(model_path, **load).to(dev).eval()
                    return score("base", model)

                value, used["base"] = store.fetch("base", base_parts, compute_base)
                if used["base"]:
                    say_reused("base")
            else:
                # the adapter goes onto the base already loaded, when there is one
                model = load_for_inference(run, dev, base=model).model

                def before_generating(model):
                    nonlocal probes, merged
                    tp = time.time()
                    if ec.forgetting and "base" not in general and hasattr(model, "disable_adapter"):
                        with model.disable_adapter():
                            general["base"] = general_scores(causal_logits(model), tok, dev, bf16=bf16)

                    def answer_nll(cs: list[list[dict]]) -> list[float]:
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                            ls = answer_losses(model, tok, cs, recipe.train.max_length, ec.batch_size, dev)
                        return [v / max(1, k) for v, k in ls]

                    probes = run_probes("sft", convs, answer_nll, ids=[e.id for e in examples], lexicon=lexicon,
                                        sample=ec.probe_sample, threshold=ec.probe_threshold,
                                        tolerance=ec.probe_tolerance, seed=recipe.train.seed)
                    probes["seconds"] = round(time.time() - tp, 2)
                    merged = (ec.merge_adapters and hasattr(model, "merge_and_unload")
                              and recipe.method.name in ("lora", "dora"))
                    if merged:
                        # Outside autocast, so the update B @ A is formed in fp32 before it is added. Last
                        # system, so the base weights can take it in place.
                        model = model.merge_and_unload()
                    return model

                value = score("tuned", model, before_generating)
            losses = [tuple(x) for x in value["losses"]]
            gen = value["text"]
            if value["general"] is not None:
                general[name] = value["general"]
            timer = BatchTimer()
            timer.batches = [tuple(b) for b in value["batches"]]
            ppl = math.exp(sum(v for v, _ in losses) / max(1, sum(k for _, k in losses)))
            cost[name] = system_cost(timer, ec.price_per_hour, dev.type)
            new_tokens = sum(len(tok(g, add_special_tokens=False)["input_ids"]) for g in gen)
            cost[name]["tokens_per_second"] = round(new_tokens / max(1e-9, cost[name]["seconds"]), 1)
            answers[name] = gen
            each = rouge_each(gen, refs)
            results[name] = {"perplexity": ppl, **_rouge_means(each), "bleu": bleu(gen, refs),
                             "merged_adapters": merged if name == "tuned" else False,
                             "mean_answer_words": sum(len(g.split()) for g in gen) / max(1, len(gen)),
                             "seconds": value["seconds"]}
            if name == "base":
                results[name]["cached"] = used["base"]
            per_example[name] = [{"text": g, **r, "loss": v / k if k else None, "tokens": k}
                                 for g, r, (v, k) in zip(gen, each, losses)]
    if not ec.forgetting:
        forgetting = not_applicable("eval.forgetting is off")
    elif "base" in general and "tuned" in general:
        forgetting = compare_general(general["base"], general["tuned"], ec.forgetting_threshold, recipe.train.seed)
    else:
        forgetting = not_applicable("needs both the base and the tuned system (or an adapter to switch off)")
    if note := reused_note(used, store.root):
        notes.append(note)
    predictions = {n: keyed(examples, ps) for n, ps in per_example.items()}
    report = Report(
        task="sft", title=f"{recipe.name}: base vs tuned", run=str(run_dir), model=recipe.model,
        systems=results, headline=headline(results, "rougeL", "higher"),
        test=TestSet(path=source, n=len(records), fingerprint=fingerprint(records)),
        examples=examples, predictions=predictions,
        train=run.train_metrics, settings={"decoding": "greedy", "max_new_tokens": ec.max_new_tokens},
        slices=slice_report("sft", [e.model_dump() for e in examples], predictions,
                            [p[-1]["content"] if p else "" for p in prompts], meta=meta, fields=ec.slices,
                            buckets=ec.length_buckets, min_size=ec.slice_min_size, seed=recipe.train.seed,
                            lexicon=lexicon),
        probes=probes, forgetting=forgetting, cost=cost, notes=notes, cache=cache_summary(used, store.root, cache),
        wall_seconds=round(time.time() - t0, 1)).model_dump(mode="json")
    report.update(report_statistics(report, default_pairs(list(results)), seed=recipe.train.seed))
    out_dir = Path(out_dir or run_dir)
    write_report(report, out_dir)
    lines = [json.dumps({"prompt": p[-1]["content"], "reference": r, **{s: answers[s][i] for s in answers}},
                        ensure_ascii=False) for i, (p, r) in enumerate(zip(prompts, refs))]
    write_text_atomic(out_dir / GENERATIONS, "\n".join(lines) + "\n")
    return report


def _rouge_means(each: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(e[k] for e in each) / max(1, len(each)) for k in ("rouge1", "rouge2", "rougeL")}


def print_sft_table(report: dict, out: Console | None = None) -> None:
    t = Table(title=f"held-out answers (n={report['test']['n']}, {report['settings']['decoding']}, "
                    f"≤{report['settings']['max_new_tokens']} new tokens)")
    for c in ("system", "perplexity ↓", "ROUGE-1 ↑", "ROUGE-2 ↑", "ROUGE-L ↑ [95% CI]", "BLEU ↑", "words/answer"):
        t.add_column(c, no_wrap=True)
    for name, m in report["systems"].items():
        iv = (report.get("intervals") or {}).get(name, {}).get("rougeL")
        ppl = m.get("perplexity")
        t.add_row(name, "-" if ppl is None else f"{ppl:.2f}",
                  *(f"{m[k]:.4f}" if k in m else "-" for k in ("rouge1", "rouge2")),
                  f"{m['rougeL']:.4f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""),
                  f"{m['bleu']:.2f}", f"{m['mean_answer_words']:.0f}")
    out = out or Console()
    out.print(t)
    print_tests(report, out)
