"""Evaluate a classify run side by side with the base model and a classical baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from ..config import Recipe, load_recipe
from ..data.validate import load_classification, stratified_sample
from ..train.classify import load_tokenizer, load_trained
from ..train.fastpath import attention_for, keep_adapter_inputs_bf16
from ..train.common import device, set_threads
from ..zoo import resolve_model
from .metrics import classification_metrics
from .predict import predict_classifier, predict_zero_shot, tfidf_logreg
from .report import print_table, write_report

console = Console(stderr=True)


def _base_is_generative(model_path: str) -> bool:
    """Decoder-only models can answer a prompt; encoders (BERT-like) cannot, so `base` is skipped."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = AutoConfig.from_pretrained(model_path)
    if cfg.architectures:
        return any(a.endswith("ForCausalLM") for a in cfg.architectures)
    return cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and cfg.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def evaluate_classify(
    run_dir: Path,
    test_path: str | None = None,
    systems: list[str] | None = None,
    out_dir: Path | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    show_progress: bool = True,
    print_results: bool = True,
) -> dict:
    t0 = time.time()
    recipe: Recipe = load_recipe(run_dir / "recipe.yaml")
    dc, ec = recipe.data, recipe.eval
    set_threads(recipe.train.threads)
    labels = json.loads((run_dir / "labels.json").read_text())
    test_path = test_path or (recipe.resolve_path(dc.test) if dc.test else None)
    if test_path is None:
        from ..errors import ConfigError

        raise ConfigError(f"{run_dir}: the recipe has no data.test; pass --data FILE")
    test = load_classification(test_path, text_field or dc.text_field, label_field or dc.label_field, labels, dc.format)
    texts = [r.text for r in test.records]
    gold = [r.label for r in test.records]
    systems = systems or list(ec.systems)
    read_up_to = ec.max_length or recipe.train.max_length
    notes: list[str] = []
    results: dict[str, dict] = {}
    train_metrics = json.loads((run_dir / "train_metrics.json").read_text())

    for name in systems:
        ts = time.time()
        if name == "tuned":
            model, tok, _, dtype = load_trained(run_dir)
            if dtype == torch.bfloat16:
                keep_adapter_inputs_bf16(model)  # predict_classifier runs under bf16 autocast
            probs = predict_classifier(model, tok, texts, ec.batch_size, read_up_to, dtype,
                                       show_progress)
            pred = [labels[i] for i in probs.argmax(-1).tolist()]
            del model
        elif name == "base":
            model_path = resolve_model(recipe.model)
            if not _base_is_generative(model_path):
                notes.append(f"base: {recipe.model} is not a generative model; zero-shot scoring skipped")
                continue
            from transformers import AutoModelForCausalLM

            dev = device()
            dtype = getattr(torch, train_metrics.get("dtype", "float32"))
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, attn_implementation=attention_for(dev, dtype)).to(dev).eval()
            tok = load_tokenizer(model_path)
            words = [(ec.verbalizer or {}).get(l, l) for l in labels]
            probs = predict_zero_shot(model, tok, texts, labels, words, ec.zero_shot_prompt, ec.batch_size,
                                      read_up_to, dtype, show_progress,
                                      # the same system turn the tuned model reads
                                      system=dc.system_prompt if dc.as_chat else None)
            pred = [labels[i] for i in probs.argmax(-1).tolist()]
            del model
        elif name == "tfidf_logreg":
            train = load_classification(recipe.resolve_path(dc.train), dc.text_field, dc.label_field, labels, dc.format)
            recs = train.records
            if dc.max_train_examples:
                # The same records the tuned model saw: a fair comparison.
                recs = stratified_sample(recs, dc.max_train_examples, recipe.train.seed)
            clf = tfidf_logreg([r.text for r in recs], [r.label for r in recs], recipe.train.seed)
            pred = list(clf.predict(texts))
        else:
            from ..errors import ConfigError

            raise ConfigError(f"unknown system {name!r} (known: base, tuned, tfidf_logreg)")
        m = classification_metrics(gold, pred, labels)
        m["wall_seconds"] = round(time.time() - ts, 2)
        m["records_per_second"] = round(len(texts) / max(1e-9, m["wall_seconds"]), 1)
        results[name] = m

    report = {
        "title": f"{recipe.name}: base vs tuned vs classical baseline",
        "run": str(run_dir),
        "model": recipe.model,
        "labels": labels,
        "test": {"path": test_path, "n": len(texts), "fingerprint": test.fingerprint},
        "train": train_metrics,
        "systems": results,
        "notes": notes,
        "wall_seconds": round(time.time() - t0, 2),
    }
    write_report(report, out_dir or run_dir)
    if print_results:
        print_table(report)
    return report
