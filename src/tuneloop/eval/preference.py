"""Evaluation of preference-tuned runs, on held-out pairs (prompt, chosen, rejected) or held-out thumbs
(prompt, completion, label desirable / undesirable: what a kto run holds out), so that a gain in preference
never hides a loss in the task.

dpo / kto runs, side by side with the base model and the run they started from (`parent`, from run.json):

    preference_accuracy  share of pairs whose implicit reward ranks chosen above rejected (ties count half):
                         r(y) = log p_system(y | x) - log p_ref(y | x), with ref the model the run was
                         trained against (its parent, else the base; the policy with its adapter off), so
                         the reference itself scores 0.5 by construction and is shown as such
    likelihood_accuracy  chosen likelier than rejected per answer token under the system alone (no reference)
    reward_margin        mean r(chosen) - r(rejected), in nats (DPO's beta times this is its reward gap)
    win_rate_vs_parent / win_rate_vs_base
                         the system's greedy answer judged better than the parent's / base's by a separately
                         trained reward run (`eval.judge`, `tuneloop eval --judge RUN`); ties count half
    rougeL, perplexity   the task metrics of textgen.py: the generated answer against the chosen (reference)
                         answer, and the perplexity of the chosen answers

on held-out thumbs (KTO's own view of the same implicit reward r, against the same reference):

    label_accuracy       share of answers whose r agrees with their label: r > 0 for a desirable answer, r < 0
                         for an undesirable one (ties count half; the reference scores 0.5 by construction)
    desirable_reward / undesirable_reward
                         mean r of the desirable / undesirable answers, in nats
    win rates            as above, on the records' prompts
    rougeL, perplexity   against the desirable answers (the references) only

reward runs: preference_accuracy of the reward model, beside the base model's per-token likelihood as a
zero-shot judge and a `length` baseline (the longer answer wins), since a reward model that only learned
"longer is better" must not pass for a good one.

Intervals and paired tests come from eval/stats.py (the one implementation the gate shares).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..data.records import Record, fingerprint
from ..errors import ConfigError, DataError, NotFoundError
from ..fileio import write_text_atomic
from ..infer.attention import attention_for
from ..infer.batching import progress_columns
from ..infer.device import device, set_threads
from ..infer.preference import prompt_turns, reward_scores, sequence_logps
from ..infer.predict import generate_answers
from ..runs import GENERATIONS, TEST_RECORDS, Run, load_for_inference, locate_run, open_run
from .cache import EvalCache, cache_summary, generative_base_parts, reused_note, say_reused, workspace_cache_dir
from .schema import Report, TestSet, headline, keyed, make_examples
from .stats import REPORT_METRICS, Metric, metric_interval, paired_test
from .textgen import rouge_l_each

SYSTEMS = ("base", "parent", "tuned")
REWARD_SYSTEMS = ("tuned", "base", "length")

console = Console(stderr=True)


def _column(key: str, direction: str = "higher") -> Metric:
    return Metric(direction, lambda p, ref, labels: [float(p[key])])


# metric → how its interval and paired test are computed from one prediction (eval/stats.py)
METRICS: dict[str, tuple[str, Metric]] = {
    "preference_accuracy": ("preference", _column("preference")),
    "likelihood_accuracy": ("likelihood", _column("likelihood")),
    "win_rate_vs_parent": ("win_vs_parent", _column("win_vs_parent")),
    "win_rate_vs_base": ("win_vs_base", _column("win_vs_base")),
    "rougeL": ("rougeL", REPORT_METRICS["sft"]["rougeL"]),
    "perplexity": ("loss", REPORT_METRICS["sft"]["perplexity"]),
}


def _ratio(m: np.ndarray) -> np.ndarray:
    # a mean over the examples of one label: mean(value x in_label) / mean(in_label)
    return np.divide(m[..., 0], m[..., 1], out=np.zeros_like(m[..., 0]), where=m[..., 1] > 0)


def _on_label(key: str, desirable: bool, direction: str = "higher") -> Metric:
    """The mean of `key` over the answers with one label, as a ratio of two column means so that a resample
    draws answers of both labels as they come."""
    def columns(p, ref, labels):
        inside = float(bool(p["desirable"]) == desirable)
        return [float(p[key]) * inside if inside else 0.0, inside]
    return Metric(direction, columns, _ratio, per_group=False)


def _desirable_perplexity(p: dict, ref, labels) -> list[float]:
    d = float(bool(p["desirable"]))
    return [float(p["loss"]) * float(p["tokens"]) * d, float(p["tokens"]) * d]


# the same, on held-out thumbs: each metric's key is the prediction field that must be there (None: no value)
THUMB_METRICS: dict[str, tuple[str, Metric]] = {
    "label_accuracy": ("label_agrees", _column("label_agrees")),
    "desirable_reward": ("reward", _on_label("reward", True)),
    "undesirable_reward": ("reward", _on_label("reward", False, "lower")),
    "win_rate_vs_parent": METRICS["win_rate_vs_parent"],
    "win_rate_vs_base": METRICS["win_rate_vs_base"],
    "rougeL": ("desirable", _on_label("rougeL", True)),
    "perplexity": ("loss", Metric("lower", _desirable_perplexity, lambda m: np.exp(_ratio(m)), per_group=False)),
}


def rank_score(a: float, b: float) -> float:
    """1 when `a` ranks above `b`, 0.5 on a tie, 0 below."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def implicit_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> list[float]:
    """r(chosen) - r(rejected) per pair, r = log p_policy - log p_ref (summed over the answer's tokens)."""
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected)]


def preference_accuracy(margins: list[float]) -> float:
    """Share of pairs with a positive margin, ties counting half (a policy equal to its reference: 0.5)."""
    return sum(rank_score(m, 0.0) for m in margins) / max(1, len(margins))


def implicit_rewards(policy: list[float], ref: list[float]) -> list[float]:
    """r(y) = log p_policy(y | x) - log p_ref(y | x) per answer (each summed over the answer's tokens)."""
    return [p - r for p, r in zip(policy, ref)]


def label_agreement(rewards: list[float], desirable: list[bool]) -> list[float]:
    """Per answer: 1 when its reward's sign agrees with its label (r > 0 desirable, r < 0 undesirable),
    0.5 at r = 0, else 0."""
    return [rank_score(r, 0.0) if d else rank_score(0.0, r) for r, d in zip(rewards, desirable)]


def label_accuracy(rewards: list[float], desirable: list[bool]) -> float:
    """Share of answers whose implicit reward agrees with their label, ties counting half (a policy equal to
    its reference: 0.5)."""
    agree = label_agreement(rewards, desirable)
    return sum(agree) / max(1, len(agree))


# ----------------------------------------------------------------------------------------------------
# inputs


def held_out_pairs(run: Run, test_path: str | None) -> tuple[str, list[Record]]:
    """The held-out pairs: `--data`, else the recipe's data.test, else the run's test.jsonl."""
    return held_out_records(run, test_path, thumbs=False)


def held_out_records(run: Run, test_path: str | None, thumbs: bool = True) -> tuple[str, list[Record]]:
    """The held-out records (`--data`, else the recipe's data.test, else the run's test.jsonl): pairs
    (prompt, chosen, rejected) when the file holds pairs, else, with `thumbs`, unpaired answers (prompt,
    completion, label desirable / undesirable), as a kto run holds out."""
    from ..data.validate import read_preferences, read_records

    recipe = run.recipe
    if test_path:
        source = test_path
    elif recipe.data.test:
        source = recipe.resolve_path(recipe.data.test)
    else:
        f = run.dir / TEST_RECORDS
        if not f.exists() or not f.read_text().strip():
            raise DataError(f"{run.dir}: no held-out pairs (set data.test or data.test_ratio, or pass --data "
                            f"PAIRS.jsonl, e.g. from `tuneloop data pairs --split test`)")
        source = str(f)
    # a pair file stays pairs (read as kto would read it, each pair would become two thumbs)
    unpaired = thumbs and read_records(source).shape != "preference"
    res = read_preferences(source, unpaired=unpaired)
    res.raise_if_problems()
    recs = [r for r in res.records if r.kind == ("kto" if unpaired else "preference")]
    if not recs and unpaired:
        raise DataError(f"{source}: no held-out answers (prompt, completion, label) or pairs (prompt, chosen, "
                        f"rejected) to evaluate on")
    if not recs:
        raise DataError(f"{source}: no preference pairs (prompt, chosen, rejected); preference accuracy needs "
                        f"pairs (pass --data PAIRS.jsonl)")
    return source, recs


def _judge(run: Run, judge: str | None) -> Run | None:
    """The reward run that judges the answers: `--judge` (a run folder), else the recipe's eval.judge
    (relative to the recipe; None: no win rates)."""
    spec = judge or run.recipe.eval.judge
    if spec is None:
        return None
    try:
        j = open_run(locate_run(run.recipe.resolve_path(spec) if not judge else spec))
    except NotFoundError:
        raise NotFoundError(f"{'--judge' if judge else 'eval.judge'}: {spec}: no such run folder") from None
    if j.task != "reward":
        raise ConfigError(f"{'--judge' if judge else 'eval.judge'}: {j.dir} is a {j.task} run; the judge is a "
                          f"reward run (task: reward)")
    if j.dir.resolve() == run.dir.resolve():
        raise ConfigError("--judge: a run cannot judge itself")
    return j


def _judge_overlap(judge: Run, prompts: list[str]) -> int:
    """How many held-out prompts the judge was trained on (a judge that saw them flatters whoever copies
    the references); 0 when its training data cannot be read here."""
    from ..data.validate import read_preferences

    try:
        res = read_preferences(judge.recipe.resolve_path(judge.recipe.data.train))
    except Exception:  # the judge's data moved or is unreadable: nothing to compare, said in no note
        return 0
    seen = {r.prompt for r in res.records}
    return sum(p in seen for p in prompts)


def _systems(given: list[str] | None, ec, known: tuple[str, ...], task: str) -> list[str]:
    # eval.systems' default is the classifier's list (and a run's stored recipe spells it out): a recipe
    # that left it at that gets every system of this task
    default = type(ec).model_fields["systems"].default_factory()
    names = given or (list(known) if ec.systems == default else [s for s in ec.systems if s in known])
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown system {name!r} for {task} (known: {', '.join(known)})")
    return [s for s in known if s in names]  # in the table's order


@contextmanager
def _adapter_off(model):
    """The policy with its adapter switched off: the model it was trained against."""
    with model.disable_adapter():
        yield model


# ----------------------------------------------------------------------------------------------------
# dpo / kto


def evaluate_preference(run_dir: "Path | Run", test_path: str | None = None, systems: list[str] | None = None,
                        out_dir: Path | None = None, show_progress: bool = True, judge: str | None = None,
                        cache: bool = True) -> dict:
    """base / parent / tuned on the held-out pairs: preference accuracy (implicit reward), likelihood
    accuracy, win rates by the judge, ROUGE-L and perplexity; on held-out thumbs (kto data): label accuracy
    and the mean reward of each label instead of the first two. Writes report.json, report.html and
    generations.jsonl (every prompt with the reference and each system's answer). `cache`: read the base
    system from the workspace's eval cache when nothing that determines it changed (eval/cache.py)."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    run = open_run(run_dir)
    recipe, ec = run.recipe, run.recipe.eval
    set_threads(recipe.train.threads)
    dev = device()
    source, recs = held_out_records(run, test_path)
    if ec.max_test_examples:
        recs = recs[: ec.max_test_examples]
    thumbs = recs[0].kind == "kto"
    names = _systems(systems, ec, SYSTEMS, run.task)
    has_parent = run.info.parent_run is not None
    if "parent" in names and not has_parent:
        if systems:
            raise ConfigError(f"--systems: parent: {run.dir} started from {run.info.base_model}, not from a run")
        names.remove("parent")
    judge_run = _judge(run, judge)
    if not run.is_adapter:
        raise ConfigError(f"{run.dir}: full-weight {run.task} runs are not evaluated (the reference is the "
                          f"policy with its adapter off)")

    prompts = [r.prompt for r in recs]
    sys_turns = [r.meta.get("system") for r in recs]
    if thumbs:
        completions = [r.completion for r in recs]
        desirable = [r.label == "desirable" for r in recs]
        # the references of the task metrics (and of the judge's score of references): the desirable answers
        chosen = [c for c, d in zip(completions, desirable) if d]
        answer_sets = {"k": completions}
    else:
        chosen, rejected = [r.chosen for r in recs], [r.rejected for r in recs]
        answer_sets = {"c": chosen, "r": rejected}
    # a prompt asked twice (two thumbs, or two pairs, on it) is answered once: greedy gives the same answer
    asked = list(dict.fromkeys(zip(prompts, sys_turns)))
    which = {k: i for i, k in enumerate(asked)}
    answer_of = [which[k] for k in zip(prompts, sys_turns)]
    turns = [prompt_turns(p, s) for p, s in asked]
    bs, max_len = ec.batch_size, recipe.train.max_length
    loaded = load_for_inference(run, dev)
    tok, bf16 = loaded.tokenizer, loaded.autocast
    # the reference of the implicit reward: the policy with its adapter off (the parent, else the base)
    reference = "parent" if has_parent else "base"

    def logps(model, answers):
        return sequence_logps(model, tok, prompts, answers, bs, max_len, sys_turns, bf16)

    scored: dict[str, dict[str, Any]] = {}
    store = EvalCache(workspace_cache_dir(run.dir), enabled=cache)
    used: dict[str, bool] = {}
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        def score(name: str, model, merge: bool = False) -> dict:
            ts = time.time()
            # lc, nc (chosen), lr, nr (rejected) on pairs; lk, nk (the completions) on thumbs
            lp: dict[str, Any] = {}
            for key, answers in answer_sets.items():
                lp["l" + key], lp["n" + key] = logps(model, answers)
            if merge:
                # the last system: its adapter can go into the weights in place (as textgen.evaluate_sft does);
                # log-probs above were taken through the adapter, unmerged
                model = model.merge_and_unload()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                gen = generate_answers(model, tok, turns, ec.max_new_tokens, min(bs, 16), dev, progress,
                                       f"{name}: generate")
            return {**lp, "text": [gen[i] for i in answer_of], "seconds": time.time() - ts}

        def base_parts(via: str) -> dict | None:
            # everything the base system's log-probs and greedy answers depend on (eval/cache.py); `via`: the
            # policy with its adapter off, or the base model loaded alone (the same weights, other code)
            return generative_base_parts(run, run.tokenizer_path(), [prompts, sys_turns, answer_sets], via=via,
                                         max_length=max_len, batch_size=bs, max_new_tokens=ec.max_new_tokens)

        def cached_base(via: str, compute) -> dict:
            value, used["base"] = store.fetch("base", base_parts(via), compute)
            if used["base"]:
                say_reused("base")
            return value

        with _adapter_off(loaded.model) as ref_model:
            if reference in names:
                scored[reference] = (cached_base("adapter_off", lambda: score("base", ref_model))
                                     if reference == "base" else score(reference, ref_model))
                ref = {key: scored[reference]["l" + key] for key in answer_sets}
            else:
                ref = {key: logps(ref_model, answers)[0] for key, answers in answer_sets.items()}
        if "base" in names and reference != "base":
            def compute_base() -> dict:
                base = AutoModelForCausalLM.from_pretrained(
                    run.base_model_path(), dtype=loaded.dtype, attn_implementation=attention_for(dev, loaded.dtype))
                return score("base", base.to(dev).eval())

            scored["base"] = cached_base("alone", compute_base)
        if "tuned" in names:
            scored["tuned"] = score("tuned", loaded.model,
                                    merge=ec.merge_adapters and recipe.method.name in ("lora", "dora"))
        del loaded
        scored = {n: scored[n] for n in SYSTEMS if n in scored}  # the table's order

    notes: list[str] = []
    judged: dict[str, list[float]] = {}
    if judge_run is not None:
        j = load_for_inference(judge_run, dev)
        for name in scored:
            judged[name] = reward_scores(j.model, j.tokenizer, prompts, scored[name]["text"], bs, max_len,
                                         sys_turns, j.autocast)
        ref_prompts, ref_sys = ((prompts, sys_turns) if not thumbs else
                                ([p for p, d in zip(prompts, desirable) if d],
                                 [s for s, d in zip(sys_turns, desirable) if d]))
        ref_scores = reward_scores(j.model, j.tokenizer, ref_prompts, chosen, bs, max_len, ref_sys, j.autocast)
        del j
        seen = _judge_overlap(judge_run, prompts)
        if seen:
            notes.append(f"judge {judge_run.dir.name} was trained on {seen} of the {len(prompts)} held-out prompts: "
                         f"its win rates favour answers close to the references")
    else:
        ref_scores = None
        notes.append("no judge (eval.judge or --judge RUN: a reward run): win rates not measured")

    settings = {"reference": reference, "parent_run": run.info.parent_run, "decoding": "greedy",
                "max_new_tokens": ec.max_new_tokens, "judge": str(judge_run.dir) if judge_run else None,
                "judge_score_of_references": (sum(ref_scores) / len(ref_scores)) if ref_scores else None}
    if thumbs:
        results, per_example = _thumb_results(scored, ref["k"], completions, desirable, judged, reference)
        notes.append(f"label_accuracy: the implicit reward is measured against {reference} (the model the run "
                     f"was trained against), which scores 0.5 by construction")
        notes.append(f"rougeL and perplexity: against the {sum(desirable)} desirable answers of the "
                     f"{len(recs)} held out" if any(desirable) else
                     "no desirable answers held out: rougeL and perplexity not measured")
        examples = make_examples([p or "" for p in prompts], completions, [{"label": r.label} for r in recs])
        settings |= {"desirable": sum(desirable), "undesirable": len(recs) - sum(desirable)}
        metric, metrics, unit = "label_accuracy", THUMB_METRICS, "answers"
    else:
        results, per_example = _preference_results(scored, ref["c"], ref["r"], chosen, judged, reference)
        notes.append(f"preference_accuracy: the implicit reward is measured against {reference} (the model the "
                     f"run was trained against), which scores 0.5 by construction")
        examples = make_examples([p or "" for p in prompts], chosen, [{"rejected": r} for r in rejected])
        metric, metrics, unit = "preference_accuracy", METRICS, "pairs"
    if "base" in results and "base" in used:
        results["base"]["cached"] = used["base"]
    if note := reused_note(used, store.root):
        notes.append(note)
    report = Report(
        task=run.task, title=f"{recipe.name}: base vs {'parent vs ' if has_parent else ''}{run.task}",
        run=str(run.dir), model=recipe.model, systems=results, headline=headline(results, metric, "higher"),
        test=TestSet(path=source, n=len(recs), fingerprint=fingerprint(recs)), examples=examples,
        predictions={n: keyed(examples, ps) for n, ps in per_example.items()}, train=run.train_metrics,
        settings=settings, notes=notes, cache=cache_summary(used, store.root, cache),
        wall_seconds=round(time.time() - t0, 1)).model_dump(mode="json")
    report.update(statistics_for(report, [("tuned", s) for s in results if s != "tuned"], metrics, unit))
    out = Path(out_dir or run.dir)
    _write(report, out)
    if thumbs:
        lines = [{"prompt": p, "completion": c, "label": r.label, **{s: scored[s]["text"][i] for s in scored}}
                 for i, (p, c, r) in enumerate(zip(prompts, completions, recs))]
    else:
        lines = [{"prompt": p, "reference": c, "rejected": r, **{s: scored[s]["text"][i] for s in scored}}
                 for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))]
    write_text_atomic(out / GENERATIONS, "".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines))
    return report


def _preference_results(scored: dict, ref_c, ref_r, chosen: list[str], judged: dict, reference: str):
    """System metrics and per-example predictions from each system's log-probs, answers and judge scores."""
    results: dict[str, dict] = {}
    per_example: dict[str, list[dict]] = {}
    for name, s in scored.items():
        margins = implicit_margins(s["lc"], s["lr"], ref_c, ref_r)
        pref = [rank_score(m, 0.0) for m in margins]
        likely = [rank_score(c / max(1, k), r / max(1, q)) for c, k, r, q in zip(s["lc"], s["nc"], s["lr"], s["nr"])]
        rouge = rouge_l_each(s["text"], chosen)
        wins = _wins(name, scored, judged)
        nll, tokens = -sum(s["lc"]), sum(s["nc"])
        results[name] = {
            "preference_accuracy": None if name == reference else sum(pref) / len(pref),
            "likelihood_accuracy": sum(likely) / len(likely),
            "reward_margin": None if name == reference else sum(margins) / len(margins),
            "win_rate_vs_parent": sum(wins["parent"]) / len(pref) if "parent" in wins else None,
            "win_rate_vs_base": sum(wins["base"]) / len(pref) if "base" in wins else None,
            "judge_score": sum(judged[name]) / len(pref) if name in judged else None,
            "rougeL": sum(rouge) / len(rouge),
            "perplexity": math.exp(nll / max(1, tokens)),
            "mean_answer_words": sum(len(t.split()) for t in s["text"]) / len(pref),
            "seconds": round(s["seconds"], 1),
        }
        per_example[name] = [
            {"text": t, "rougeL": rg, "loss": -c / max(1, k), "tokens": k, "logp_chosen": c, "logp_rejected": r,
             "margin": m, "preference": p if name != reference else None, "likelihood": lk,
             "judge": judged[name][i] if name in judged else None,
             "win_vs_parent": wins["parent"][i] if "parent" in wins else None,
             "win_vs_base": wins["base"][i] if "base" in wins else None}
            for i, (t, rg, c, k, r, m, p, lk) in enumerate(zip(s["text"], rouge, s["lc"], s["nc"], s["lr"], margins,
                                                             pref, likely))]
    return results, per_example


def _wins(name: str, scored: dict, judged: dict) -> dict[str, list[float]]:
    """Per example, against the parent's and the base's answers where both were judged: 1 when `name`'s
    answer scored higher, 0.5 when the answers are the same or tie."""
    wins = {}
    for other in ("parent", "base"):
        if name in judged and other in judged and other != name:
            wins[other] = [0.5 if a == b else rank_score(x, y) for a, b, x, y in
                           zip(scored[name]["text"], scored[other]["text"], judged[name], judged[other])]
    return wins


def _thumb_results(scored: dict, ref_logps: list[float], completions: list[str], desirable: list[bool],
                   judged: dict, reference: str):
    """System metrics and per-example predictions on held-out thumbs, from each system's log-probs of the
    answers, its own answers and their judge scores."""
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    results: dict[str, dict] = {}
    per_example: dict[str, list[dict]] = {}
    n = len(completions)
    for name, s in scored.items():
        is_ref = name == reference
        rewards = implicit_rewards(s["lk"], ref_logps)
        agree = label_agreement(rewards, desirable)
        good = [i for i in range(n) if desirable[i]]
        rouge = dict(zip(good, rouge_l_each([s["text"][i] for i in good], [completions[i] for i in good])))
        wins = _wins(name, scored, judged)
        nll, tokens = -sum(s["lk"][i] for i in good), sum(s["nk"][i] for i in good)
        results[name] = {
            "label_accuracy": None if is_ref else mean(agree),
            "desirable_reward": None if is_ref else mean([rewards[i] for i in good]),
            "undesirable_reward": None if is_ref else mean([r for r, d in zip(rewards, desirable) if not d]),
            "win_rate_vs_parent": mean(wins["parent"]) if "parent" in wins else None,
            "win_rate_vs_base": mean(wins["base"]) if "base" in wins else None,
            "judge_score": mean(judged[name]) if name in judged else None,
            "rougeL": mean(list(rouge.values())),
            "perplexity": math.exp(nll / tokens) if tokens else None,
            "mean_answer_words": sum(len(t.split()) for t in s["text"]) / n,
            "seconds": round(s["seconds"], 1),
        }
        per_example[name] = [
            {"text": s["text"][i], "desirable": desirable[i], "rougeL": rouge.get(i), "loss": -c / max(1, k),
             "tokens": k, "logp": c, "reward": None if is_ref else rewards[i],
             "label_agrees": None if is_ref else agree[i],
             "judge": judged[name][i] if name in judged else None,
             "win_vs_parent": wins["parent"][i] if "parent" in wins else None,
             "win_vs_base": wins["base"][i] if "base" in wins else None}
            for i, (c, k) in enumerate(zip(s["lk"], s["nk"]))]
    return results, per_example


def statistics_for(report: dict, pairs: list[tuple[str, str]],
                   metrics: dict[str, tuple[str, Metric]] = METRICS, unit: str = "pairs") -> dict:
    """`intervals` and `tests` (eval/stats.py) of the `metrics` (METRICS, or THUMB_METRICS on held-out
    thumbs) that a report's predictions carry and its systems have a value of."""
    from .stats import CONFIDENCE, RESAMPLES

    ids = [e["id"] for e in report["examples"]]
    refs = [e["reference"] for e in report["examples"]]
    rng = np.random.default_rng(0)

    def columns(system: str, metric: str):
        key, m = metrics[metric]
        preds = [report["predictions"][system][i] for i in ids]
        if report["systems"][system].get(metric) is None or any(p is None or p.get(key) is None for p in preds):
            return None
        return np.array([m.columns(p, r, []) for p, r in zip(preds, refs)], dtype=np.float64)

    intervals: dict[str, dict[str, list[float]]] = {}
    for system in report["predictions"]:
        for metric, (_, m) in metrics.items():
            cols = columns(system, metric)
            if cols is not None:
                intervals.setdefault(system, {})[metric] = list(metric_interval(cols, m, rng=rng))
    tests = []
    for a, b in pairs:
        for metric, (_, m) in metrics.items():
            ca, cb = columns(a, metric), columns(b, metric)
            if ca is None or cb is None:
                continue
            t = paired_test(m, ca, cb, rng=rng)
            better = a if (t["delta"] > 0) == (m.direction == "higher") else b
            tests.append({"a": a, "b": b, "metric": metric, "direction": m.direction,
                          "better": better if t["delta"] != 0 else None, **t})
    return {"intervals": intervals, "tests": tests,
            "statistics": {"confidence": CONFIDENCE, "resamples": RESAMPLES, "seed": 0,
                           "interval": "bootstrap BCa (percentile where BCa is undefined), scipy.stats.bootstrap",
                           "paired": f"paired bootstrap over the held-out {unit}"}}


def _write(report: dict, out: Path) -> None:
    from .report import render_preference_html, write_report

    write_report(report, out, render=render_preference_html)


# ----------------------------------------------------------------------------------------------------
# reward


def evaluate_reward(run_dir: "Path | Run", test_path: str | None = None, systems: list[str] | None = None,
                    out_dir: Path | None = None, show_progress: bool = True, cache: bool = True) -> dict:
    """The reward model's preference accuracy on held-out pairs, beside the base model's per-token
    likelihood (a zero-shot judge) and the longer-answer baseline; writes report.json and report.html."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    run = open_run(run_dir)
    recipe, ec = run.recipe, run.recipe.eval
    set_threads(recipe.train.threads)
    dev = device()
    source, recs = held_out_pairs(run, test_path)
    if ec.max_test_examples:
        recs = recs[: ec.max_test_examples]
    names = _systems(systems, ec, REWARD_SYSTEMS, "reward")
    prompts = [r.prompt for r in recs]
    sys_turns = [r.meta.get("system") for r in recs]
    chosen, rejected = [r.chosen for r in recs], [r.rejected for r in recs]
    bs, max_len = ec.batch_size, recipe.train.max_length
    margins: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    store = EvalCache(workspace_cache_dir(run.dir), enabled=cache)
    used: dict[str, bool] = {}
    for name in names:
        ts = time.time()
        if name == "tuned":
            j = load_for_inference(run, dev)
            sc = reward_scores(j.model, j.tokenizer, prompts, chosen, bs, max_len, sys_turns, j.autocast)
            sr = reward_scores(j.model, j.tokenizer, prompts, rejected, bs, max_len, sys_turns, j.autocast)
            margins[name] = [c - r for c, r in zip(sc, sr)]
            del j
        elif name == "base":
            path = run.base_model_path()

            def compute_base() -> dict:
                from ..infer.encode import load_tokenizer

                t = time.time()
                dtype = getattr(torch, run.info.dtype or "float32")
                base = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, attn_implementation=attention_for(dev, dtype)).to(dev).eval()
                tok = load_tokenizer(path, chat=True)
                lc, nc = sequence_logps(base, tok, prompts, chosen, bs, max_len, sys_turns, dtype == torch.bfloat16)
                lr, nr = sequence_logps(base, tok, prompts, rejected, bs, max_len, sys_turns, dtype == torch.bfloat16)
                return {"margins": [c / max(1, k) - r / max(1, q) for c, k, r, q in zip(lc, nc, lr, nr)],
                        "seconds": round(time.time() - t, 1)}

            # the base model reads with its own tokenizer here (a zero-shot judge of the pairs)
            parts = generative_base_parts(run, path, [prompts, sys_turns, chosen, rejected], via="judge",
                                          max_length=max_len, batch_size=bs)
            value, used["base"] = store.fetch("base", parts, compute_base)
            if used["base"]:
                say_reused("base")
            margins[name] = value["margins"]
            seconds[name] = value["seconds"]
            continue
        else:
            margins[name] = [float(len(c.split()) - len(r.split())) for c, r in zip(chosen, rejected)]
        seconds[name] = round(time.time() - ts, 1)
    results = {n: {"preference_accuracy": preference_accuracy(m), "mean_margin": sum(m) / len(m),
                   "seconds": seconds[n]} for n, m in margins.items()}
    examples = make_examples([p or "" for p in prompts], chosen, [{"rejected": r} for r in rejected])
    per_example = {n: [{"margin": v, "preference": rank_score(v, 0.0)} for v in m] for n, m in margins.items()}
    notes = ["margins: reward difference (tuned), per-token log-prob difference (base), word-count difference "
             "(length)"]
    if "base" in results:
        results["base"]["cached"] = used["base"]
    if note := reused_note(used, store.root):
        notes.append(note)
    report = Report(
        task="reward", title=f"{recipe.name}: reward model vs zero-shot and length baselines", run=str(run.dir),
        model=recipe.model, systems=results, headline=headline(results, "preference_accuracy", "higher"),
        test=TestSet(path=source, n=len(recs), fingerprint=fingerprint(recs)), examples=examples,
        predictions={n: keyed(examples, ps) for n, ps in per_example.items()}, train=run.train_metrics,
        settings={"base": "mean log-prob per answer token", "length": "more words wins"},
        notes=notes, cache=cache_summary(used, store.root, cache),
        wall_seconds=round(time.time() - t0, 1)).model_dump(mode="json")
    report.update(statistics_for(report, [("tuned", s) for s in results if s != "tuned"]))
    _write(report, Path(out_dir or run.dir))
    return report


# ----------------------------------------------------------------------------------------------------
# tables


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _with_interval(report: dict, system: str, metric: str, v) -> str:
    iv = (report.get("intervals") or {}).get(system, {}).get(metric)
    return _fmt(v, ".2f") + (f" [{iv[0]:.2f},{iv[1]:.2f}]" if iv and v is not None else "")


def print_preference_table(report: dict, out: Console | None = None) -> None:
    """Fits 80 columns: the win rate against the base and the judge scores are in report.html."""
    from rich import box

    if report["headline"]["metric"] == "label_accuracy":
        return _print_thumb_table(report, out)
    ref = report["settings"].get("reference")
    t = Table(title=f"held-out pairs (n={report['test']['n']}), implicit reward vs {ref}, greedy "
                    f"≤{report['settings']['max_new_tokens']} tokens", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in ("system", "pref acc ↑", "lik acc ↑", "win/parent ↑", "ROUGE-L ↑", "ppl ↓"):
        t.add_column(c, no_wrap=True)
    for name, m in report["systems"].items():
        pa = "reference" if name == ref else _with_interval(report, name, "preference_accuracy",
                                                            m["preference_accuracy"])
        t.add_row(name, pa, _fmt(m["likelihood_accuracy"], ".2f"),
                  _with_interval(report, name, "win_rate_vs_parent", m["win_rate_vs_parent"]),
                  _fmt(m["rougeL"], ".3f"), _fmt(m["perplexity"], ".1f"))
    (out or Console()).print(t)


def _print_thumb_table(report: dict, out: Console | None = None) -> None:
    """Held-out thumbs: label accuracy and the mean reward of each label in place of the pair metrics."""
    from rich import box

    ref, st = report["settings"].get("reference"), report["settings"]
    # one column more than the pair table: collapsed padding keeps it within 80 columns
    t = Table(title=f"held-out answers (n={report['test']['n']}, {st.get('desirable')} desirable), "
                    f"reward vs {ref}, greedy ≤{st['max_new_tokens']} tokens", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True, caption="r+ / r-: mean implicit reward (nats) of the desirable / undesirable "
                                             "answers")
    for c in ("system", "label acc ↑", "r+ ↑", "r- ↓", "win/parent ↑", "ROUGE-L ↑", "ppl ↓"):
        t.add_column(c, no_wrap=True)
    for name, m in report["systems"].items():
        la = "reference" if name == ref else _with_interval(report, name, "label_accuracy", m["label_accuracy"])
        t.add_row(name, la, _fmt(m["desirable_reward"], "+.2f"), _fmt(m["undesirable_reward"], "+.2f"),
                  _with_interval(report, name, "win_rate_vs_parent", m["win_rate_vs_parent"]),
                  _fmt(m["rougeL"], ".3f"), _fmt(m["perplexity"], ".1f"))
    (out or Console()).print(t)


def print_reward_table(report: dict, out: Console | None = None) -> None:
    from rich import box

    t = Table(title=f"held-out pairs (n={report['test']['n']})", box=box.SIMPLE_HEAD)
    for c in ("system", "preference accuracy ↑", "mean margin"):
        t.add_column(c, no_wrap=True)
    for name, m in report["systems"].items():
        t.add_row(name, _with_interval(report, name, "preference_accuracy", m["preference_accuracy"]),
                  _fmt(m["mean_margin"]))
    (out or Console()).print(t)
