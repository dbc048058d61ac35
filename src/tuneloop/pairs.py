"""`tuneloop data pairs`: preference pairs from chat records, the record's own answer as `chosen` and a
model's greedy answer to the same prompt as `rejected` (e.g. the firm's FAQ answers preferred over the base
model's). Generation needs infer/, so this sits above data/ rather than in it.

The pairs are built from the training split only, split exactly as `tuneloop train` splits the SFT recipe
(`data.test`, else `data.test_ratio` with `train.seed`, through `data.chat.holdout`), so a question held out
to evaluate the SFT run (and the DPO run after it) never turns up in the preference data. `--split test`
builds the held-out pairs an evaluation reads, and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from .data.chat import holdout, load_chat
from .data.records import Record, fingerprint
from .errors import ConfigError, DataError

console = Console(stderr=True)

SPLITS = ("train", "test")


@dataclass
class Split:
    """The records of one side of an SFT recipe's split, and where they came from (for the output's notes)."""

    records: list[Record]
    split: str
    source: str
    held_out: int  # records on the other side of the split
    how: str  # a sentence: which split, made how


def recipe_split(source: str | None, recipe=None, run_dir: Path | None = None, split: str = "train",
                 test_ratio: float | None = None, seed: int | None = None) -> Split:
    """One side of the split `tuneloop train` makes for an sft recipe (or an sft run's stored recipe, whose
    test split is then checked against the run's fingerprint), or of an explicit `test_ratio` / `seed`.
    The training side includes the validation records: only the test split is held out of everything."""
    if split not in SPLITS:
        raise ConfigError(f"--split: unknown split {split!r} (known: {', '.join(SPLITS)})")
    if recipe is not None:
        if recipe.task != "sft":
            raise ConfigError(f"--recipe: task {recipe.task!r}; give the sft recipe (or run) whose split the "
                              f"pairs must follow")
        if test_ratio is not None or seed is not None:
            raise ConfigError("--recipe decides the split; drop --test-ratio / --seed")
        dc = recipe.data
        train_spec = recipe.resolve_path(dc.train)
        if source is not None and Path(source).expanduser().resolve() != Path(train_spec).expanduser().resolve() \
                and source != train_spec:
            raise ConfigError(f"SOURCE {source}: the recipe trains on {train_spec}; its split is only known "
                              f"for that file (drop SOURCE, or --recipe)")
        records = load_chat(train_spec, dc.format)
        if dc.test:
            test_spec = recipe.resolve_path(dc.test)
            test = load_chat(test_spec, dc.format)
            how = f"data.test {test_spec} is held out; {train_spec} is the training split"
        else:
            records, test = holdout(records, dc.test_ratio or 0.0, recipe.train.seed)
            how = (f"the split of recipe {recipe.name!r}: data.test_ratio {dc.test_ratio} with seed "
                   f"{recipe.train.seed} holds out {len(test)} of {len(records) + len(test)} records")
        if run_dir is not None:
            from .runs import open_run

            want = open_run(run_dir).info.data.test
            if want is not None and fingerprint(test) != want:
                raise DataError(f"{run_dir}: its test split no longer matches {train_spec} (the file changed "
                                f"since the run trained); the pairs could leak held-out questions")
            how += f" (checked against run {Path(run_dir).name})"
        spec = train_spec
    else:
        if source is None:
            raise ConfigError("give SOURCE (a data file) or --recipe")
        if test_ratio is None:
            raise ConfigError("--recipe (the sft recipe or run whose split to follow) or --test-ratio is needed, so "
                              "that held-out questions stay out of the pairs; --test-ratio 0 when SOURCE holds "
                              "training records only")
        records = load_chat(source)
        records, test = holdout(records, test_ratio, 0 if seed is None else seed)
        how = f"--test-ratio {test_ratio} with seed {0 if seed is None else seed} holds out {len(test)} records"
        spec = source
    if split == "train":
        return Split(records, "train", spec, len(test), how)
    if not test:
        raise ConfigError("--split test: this split holds nothing out")
    return Split(test, "test", spec, len(records), how)


def _load_generator(model: str, workspace: Path | None):
    """(model, tokenizer, dtype) for greedy answers: a zoo name / folder / hub id, a run folder, or a
    registered version (NAME:VERSION, NAME@ALIAS) with its adapter merged in for speed."""
    from .infer.attention import attention_for
    from .infer.device import device, pick_dtype
    from .infer.encode import load_tokenizer
    from .runs import is_run_dir, load_for_inference

    dev = device()
    target = Path(model).expanduser()
    if not target.is_dir() and workspace is not None and (Path(workspace) / "runs" / model).is_dir():
        target = Path(workspace) / "runs" / model
    run_dir = target if target.is_dir() and is_run_dir(target) else None
    if run_dir is None and workspace is not None:
        from . import registry

        if registry.is_ref(model):
            run_dir = Path(registry.resolve(workspace, model).run_dir)
    if run_dir is not None:
        loaded = load_for_inference(run_dir, dev)
        m = loaded.model
        if hasattr(m, "merge_and_unload") and loaded.run.info.method in ("lora", "dora"):
            m = m.merge_and_unload()
        return m, loaded.tokenizer, loaded.dtype, dev
    from transformers import AutoModelForCausalLM

    from .zoo import resolve_model

    path = resolve_model(model)
    dtype = pick_dtype("auto", dev)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention_for(dev, dtype))
    return m.to(dev).eval(), load_tokenizer(path, chat=True), dtype, dev


def _single_turn(r: Record) -> tuple[list[dict], str] | None:
    """(prompt turns, answer) of a (system +) user + assistant record; None for a longer conversation,
    which the preference shape cannot hold."""
    m = r.messages or []
    body = m[1:] if m and m[0]["role"] == "system" else m
    if len(body) != 2 or body[0]["role"] != "user" or body[1]["role"] != "assistant":
        return None
    return m[:-1], m[-1]["content"]


def _same(a: str, b: str, max_similarity: float) -> bool:
    from .eval.textgen import rouge_l_each

    if " ".join(a.lower().split()) == " ".join(b.lower().split()):
        return True
    return rouge_l_each([b], [a])[0] >= max_similarity


@dataclass
class PairsResult:
    pairs: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def build_pairs(records: list[Record], model, tok, dev, *, max_new_tokens: int = 128, batch_size: int = 16,
                max_similarity: float = 0.9, autocast: bool = False, show_progress: bool = True,
                label: str = "rejected: generate") -> PairsResult:
    """One `{"prompt", "chosen", "rejected"}` per usable record, in record order: `chosen` is the record's
    answer, `rejected` the model's greedy answer. A pair whose answers are near-identical (ROUGE-L F1 at or
    above `max_similarity`, or equal up to case and spacing) teaches nothing and is dropped, as is an empty
    generation or a conversation of more than one exchange; each drop is counted."""
    from .infer.batching import progress_columns
    from .infer.predict import generate_answers

    dropped = {"near_identical": 0, "empty_answer": 0, "not_single_turn": 0}
    usable = []
    for r in records:
        turn = _single_turn(r)
        if turn is None:
            dropped["not_single_turn"] += 1
        else:
            usable.append(turn)
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            answers = generate_answers(model, tok, [p for p, _ in usable], max_new_tokens, batch_size, dev,
                                       progress, label) if usable else []
    pairs = []
    for (prompt, chosen), rejected in zip(usable, answers):
        if not rejected.strip():
            dropped["empty_answer"] += 1
        elif _same(chosen, rejected, max_similarity):
            dropped["near_identical"] += 1
        else:
            # a system turn rides along as a conversational prompt (the preference shape reads both)
            p: Any = prompt[0]["content"] if len(prompt) == 1 else prompt
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return PairsResult(pairs, {"records": len(records), "pairs": len(pairs), "dropped": dropped})


def make_pairs(out: Path, rejected_from: str, source: str | None = None, recipe_path: Path | None = None,
               split: str = "train", test_ratio: float | None = None, seed: int | None = None,
               max_new_tokens: int = 128, batch_size: int = 16, max_similarity: float = 0.9,
               max_records: int | None = None, workspace: Path | None = None, show_progress: bool = True) -> dict:
    """The command: split → generate → drop near-identical → write OUT atomically (preference shape).
    `recipe_path`: an sft recipe YAML or an sft run folder. Returns the summary it prints."""
    from .config import load_recipe
    from .fileio import write_text_atomic
    from .runs import RECIPE, is_run_dir

    t0 = time.time()
    if not 0 < max_similarity <= 1:
        raise ConfigError(f"--max-similarity: {max_similarity} is not in (0, 1]")
    recipe = run_dir = None
    if recipe_path is not None:
        p = Path(recipe_path).expanduser()
        if p.is_dir() and is_run_dir(p):
            run_dir, recipe = p, load_recipe(p / RECIPE)
        else:
            recipe = load_recipe(p)
    part = recipe_split(source, recipe, run_dir, split, test_ratio, seed)
    records = part.records[:max_records] if max_records else part.records
    model, tok, dtype, dev = _load_generator(rejected_from, workspace)
    res = build_pairs(records, model, tok, dev, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      max_similarity=max_similarity, autocast=dtype == torch.bfloat16, show_progress=show_progress,
                      label=f"{split}: answers of {Path(rejected_from).name or rejected_from}")
    if not res.pairs:
        raise DataError(f"{part.source}: no pairs left (every answer was near-identical, empty or multi-turn: "
                        f"{res.summary['dropped']})")
    write_text_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in res.pairs))
    if split == "train":
        note = (f"built from the training split only: {part.how}; none of those {part.held_out} held-out "
                f"questions is in {out}")
    else:
        note = (f"built from the HELD-OUT split ({part.how}): for evaluation only, never train on {out}")
    return {"out": str(out), "source": part.source, "split": split, "rejected_from": rejected_from,
            **res.summary, "held_out": part.held_out, "max_new_tokens": max_new_tokens,
            "max_similarity": max_similarity, "note": note, "seconds": round(time.time() - t0, 1)}
