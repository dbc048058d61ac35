"""Evaluate a classify run side by side with the base model and a classical baseline."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from ..data.validate import load_classification, stratified_sample
from ..errors import ConfigError
from ..infer.attention import attention_for
from ..infer.device import device, set_threads
from ..infer.encode import load_tokenizer
from ..infer.predict import predict_classifier
from ..runs import Run, load_for_inference, open_run
from .forgetting import forgetting_for_head, not_applicable
from .metrics import classification_metrics
from .predict import predict_zero_shot, tfidf_logreg
from .probes import load_lexicon, run_probes
from .report import print_table, write_report
from .schema import Report, TestSet, headline, keyed, make_examples
from .slices import slice_report

SYSTEMS = ("base", "tuned", "tfidf_logreg")

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
    run_dir: "Path | Run",
    test_path: str | None = None,
    systems: list[str] | None = None,
    out_dir: Path | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    show_progress: bool = True,
    print_results: bool = True,
) -> dict:
    t0 = time.time()
    run = open_run(run_dir)
    recipe, run_dir = run.recipe, run.dir
    dc, ec = recipe.data, recipe.eval
    set_threads(recipe.train.threads)
    labels = run.info.labels
    test_path = test_path or (recipe.resolve_path(dc.test) if dc.test else None)
    if test_path is None:
        raise ConfigError(f"{run_dir}: the recipe has no data.test; pass --data FILE")
    test = load_classification(test_path, text_field or dc.text_field, label_field or dc.label_field, labels, dc.format)
    texts = [r.text for r in test.records]
    gold = [r.label for r in test.records]
    systems = systems or list(ec.systems)
    for name in systems:
        if name not in SYSTEMS:
            raise ConfigError(f"unknown system {name!r} for classify (known: {', '.join(SYSTEMS)})")
    spec = run.info.input
    read_up_to = spec.max_length
    notes: list[str] = []
    results: dict[str, dict] = {}
    per_example: dict[str, list[dict]] = {}
    train_metrics = run.train_metrics
    meta = [{f: r.meta.get(f) for f in ec.slices} for r in test.records]
    examples = make_examples(texts, gold, meta)
    lexicon = load_lexicon(recipe.resolve_path(ec.probe_terms) if ec.probe_terms else None)
    probes: dict = {}
    forgetting: dict = {} if ec.forgetting else not_applicable("eval.forgetting is off")

    for name in systems:
        ts = time.time()
        if name == "tuned":
            tuned = load_for_inference(run)
            probs = predict_classifier(tuned.model, tuned.tokenizer, texts, ec.batch_size, read_up_to, tuned.dtype,
                                       show_progress, template=spec.template or "{text}", as_chat=spec.as_chat,
                                       system=spec.system_prompt, truncate=spec.truncate)
            pred = [labels[i] for i in probs.argmax(-1).tolist()]
            conf = probs.max(-1).values.tolist()
            tp = time.time()
            probes = run_probes(
                "classify", texts, lambda xs: [labels[i] for i in predict_classifier(
                    tuned.model, tuned.tokenizer, xs, ec.batch_size, read_up_to, tuned.dtype, False,
                    template=spec.template or "{text}", as_chat=spec.as_chat, system=spec.system_prompt,
                    truncate=spec.truncate).argmax(-1).tolist()],
                ids=[e.id for e in examples], lexicon=lexicon, sample=ec.probe_sample,
                threshold=ec.probe_threshold, seed=recipe.train.seed)
            probes["seconds"] = round(time.time() - tp, 2)
            if ec.forgetting:
                tf = time.time()
                forgetting = forgetting_for_head(run, tuned, ec.forgetting_threshold, recipe.train.seed)
                forgetting["seconds"] = round(time.time() - tf, 2)
            ts += time.time() - tp  # the system's own speed excludes its probes and forgetting check
            del tuned
        elif name == "base":
            model_path = run.base_model_path()
            if not _base_is_generative(model_path):
                notes.append(f"base: {recipe.model} is not a generative model; zero-shot scoring skipped")
                continue
            from transformers import AutoModelForCausalLM

            dev = device()
            dtype = getattr(torch, run.info.dtype or "float32")
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, attn_implementation=attention_for(dev, dtype)).to(dev).eval()
            tok = load_tokenizer(model_path)
            words = [(ec.verbalizer or {}).get(l, l) for l in labels]
            probs = predict_zero_shot(model, tok, texts, labels, words, ec.zero_shot_prompt, ec.batch_size,
                                      read_up_to, dtype, show_progress,
                                      # the same system turn the tuned model reads
                                      system=dc.system_prompt if dc.as_chat else None)
            pred = [labels[i] for i in probs.argmax(-1).tolist()]
            conf = probs.max(-1).values.tolist()
            del model
        elif name == "tfidf_logreg":
            train = load_classification(recipe.resolve_path(dc.train), dc.text_field, dc.label_field, labels, dc.format)
            recs = train.records
            if dc.max_train_examples:
                # The same records the tuned model saw: a fair comparison.
                recs = stratified_sample(recs, dc.max_train_examples, recipe.train.seed)
            clf = tfidf_logreg([r.text for r in recs], [r.label for r in recs], recipe.train.seed)
            p = clf.predict_proba(texts)
            pred = [str(c) for c in clf.classes_[p.argmax(-1)]]
            conf = p.max(-1).tolist()
        m = classification_metrics(gold, pred, labels)
        m["wall_seconds"] = round(time.time() - ts, 2)
        m["records_per_second"] = round(len(texts) / max(1e-9, m["wall_seconds"]), 1)
        results[name] = m
        per_example[name] = [{"label": l, "probability": float(c), "correct": l == g}
                             for l, c, g in zip(pred, conf, gold)]

    predictions = {n: keyed(examples, ps) for n, ps in per_example.items()}
    dumped = [e.model_dump() for e in examples]
    report = Report(
        task="classify",
        title=f"{recipe.name}: base vs tuned vs classical baseline",
        run=str(run_dir),
        model=recipe.model,
        labels=labels,
        test=TestSet(path=test_path, n=len(texts), fingerprint=test.fingerprint),
        train=train_metrics,
        systems=results,
        headline=headline(results, "accuracy", "higher"),
        examples=examples,
        predictions=predictions,
        notes=notes,
        slices=slice_report("classify", dumped, predictions, texts, meta=meta, fields=ec.slices, labels=labels,
                            buckets=ec.length_buckets, min_size=ec.slice_min_size, seed=recipe.train.seed,
                            lexicon=lexicon),
        probes=probes,
        forgetting=forgetting,
        wall_seconds=round(time.time() - t0, 2),
    ).model_dump(mode="json")
    write_report(report, out_dir or run_dir)
    if print_results:
        print_table(report)
    return report
