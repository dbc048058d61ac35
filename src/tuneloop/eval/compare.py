"""Evaluate a classify run side by side with the base model and a classical baseline."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console

from ..data.records import fingerprint
from ..data.validate import Loaded, load_classification, stratified_sample
from ..errors import ConfigError
from ..infer.attention import attention_for, bf16_matmuls
from ..infer.device import device, set_threads
from ..infer.encode import load_tokenizer
from ..infer.predict import predict_classifier
from ..runs import Run, load_for_inference, open_run
from .cache import (CACHE_DIR, EvalCache, cache_summary, library_versions, model_identity, say_reused,
                    texts_fingerprint, workspace_cache_dir)
from .calibration import CONTENT_FREE, calibration_summary, contextual_calibration
from .cost import BatchTimer, error_cost_matrix, system_cost
from .forgetting import forgetting_for_head, not_applicable
from .metrics import classification_metrics
from .predict import fewshot_examples, predict_zero_shot, prompt_shown, tfidf_logreg
from .probes import load_lexicon, run_probes
from .report import print_table, write_report
from .schema import Report, TestSet, headline, keyed, make_examples
from .slices import slice_report
from .stats import default_pairs, report_statistics

SYSTEMS = ("base", "base_fewshot", "tuned", "tfidf_logreg")
PROMPTED = ("base", "base_fewshot")  # the untuned model prompted: run on a stratified sample of a large test set
CACHED = ("base", "base_fewshot", "tfidf_logreg")  # what does not change when the tuned model does (eval/cache.py)

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


def _sample_indices(records: list, n: int | None, seed: int) -> list[int]:
    """Indices (in test order) of a stratified sample of at most n records; every index when n is None or
    the test set is no larger.

    Nested, so the eval cache can answer a rerun: each label's records are ranked by a seeded hash of their
    text and a sample takes the top of each ranking (its label's share of n, at least 1). The prompted
    systems' sample, drawn from inside the test sample, is then the same records whatever size the budget gave
    the test sample (the quickstart sized it 231, 399, 417 and 470 in four runs on one machine; with a seeded
    shuffle per size every rerun missed the cached base and few-shot results)."""
    if n is None or len(records) <= n:
        return list(range(len(records)))
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.label), []).append(i)

    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{seed}\0{records[i].text}".encode()).digest()

    quota = {k: max(1, round(n * len(v) / len(records))) for k, v in groups.items()}
    while sum(quota.values()) > n:  # rounding up in several labels: the largest gives one back
        quota[max(quota, key=lambda k: (quota[k], k))] -= 1
    chosen = [i for k in sorted(groups) for i in sorted(groups[k], key=rank)[: quota[k]]]
    return sorted(chosen)


def _train_records(recipe, labels: list[str]) -> list:
    dc = recipe.data
    train = load_classification(recipe.resolve_path(dc.train), dc.text_field, dc.label_field, labels, dc.format)
    recs = train.records
    if dc.max_train_examples:
        # The same records the tuned model saw: a fair comparison.
        recs = stratified_sample(recs, dc.max_train_examples, recipe.train.seed)
    return recs


def _load_base(run: Run, recipe, notes: list[str]):
    """The untuned causal LM and its tokenizer, or None (with a note) for an encoder."""
    model_path = run.base_model_path()
    if not _base_is_generative(model_path):
        notes.append(f"base, base_fewshot: {recipe.model} is not a generative model; prompted scoring skipped")
        return None
    from transformers import AutoModelForCausalLM

    dev = device()
    dtype = getattr(torch, run.info.dtype or "float32")
    # bf16: the layout the tuned classifier is read with (infer/attention.py `bf16_matmuls`)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32 if dtype == torch.bfloat16 else dtype,
        attn_implementation=attention_for(dev, dtype))
    if dtype == torch.bfloat16:
        bf16_matmuls(model)
    return model.to(dev).eval(), load_tokenizer(model_path), dtype


def decision_note(run: Run, notes: list[str]) -> None:
    """Say in the report how the run handled its label balance and which decision rule `tuned` used."""
    from ..runs import read_decision

    plan = run.train_metrics.get("imbalance")
    if plan:
        w = plan.get("class_weights")
        notes.append(f"tuned: trained with labels {plan['reason']}; class weights "
                     f"{', '.join(f'{l} {v:.3g}' for l, v in w.items()) if w else 'none'}, sampler {plan['sampler']}")
    d = read_decision(run.dir)
    if d:
        v = d["validation"]
        notes.append(f"tuned: decision rule from {d['metric']} on {v['n']} validation records ({v['before']:.3f} → "
                     f"{v['after']:.3f}): logit offsets " + ", ".join(f"{l} {o:+.1f}" for l, o in d["offsets"].items()))
    elif plan and plan.get("decision_note"):
        notes.append(f"tuned: {plan['decision_note']}")


def evaluate_classify(
    run_dir: "Path | Run",
    test_path: str | None = None,
    systems: list[str] | None = None,
    out_dir: Path | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    show_progress: bool = True,
    print_results: bool = True,
    cache: bool = True,
) -> dict:
    """The report of a classify run on its test set (or `test_path`). `cache`: read the base model's and the
    baseline's predictions from the workspace's eval cache when nothing that determines them changed
    (eval/cache.py); False recomputes them (and stores the fresh ones)."""
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
    notes: list[str] = []
    seed = recipe.train.seed
    if ec.test_sample and ec.test_sample < len(test.records):
        # every system on the same stratified sample, fingerprinted as what was read (the cache and the gate
        # then never mistake it for the whole set)
        full = len(test.records)
        recs = [test.records[i] for i in _sample_indices(test.records, ec.test_sample, seed)]
        test = Loaded(records=recs, labels=test.labels, fingerprint=fingerprint(recs))
        notes.append(f"test: every system on a stratified sample of {len(recs)} of the {full} test records (seed "
                     f"{seed}, eval.test_sample); intervals and paired tests are on that sample")
    texts = [r.text for r in test.records]
    gold = [r.label for r in test.records]
    systems = systems or list(ec.systems)
    for name in systems:
        if name not in SYSTEMS:
            raise ConfigError(f"unknown system {name!r} for classify (known: {', '.join(SYSTEMS)})")
    spec = run.info.input
    read_up_to = spec.max_length
    costs = error_cost_matrix(ec.error_costs, labels) if ec.error_costs else None
    results: dict[str, dict] = {}
    per_example: dict[str, list[dict | None]] = {}
    calibration: dict[str, dict] = {}
    cost: dict[str, dict] = {}
    settings: dict[str, dict] = {}
    train_metrics = run.train_metrics
    sample = _sample_indices(test.records, ec.prompted_sample, seed)
    base_lm = False  # not loaded yet; None: no generative base
    meta = [{f: r.meta.get(f) for f in ec.slices} for r in test.records]
    examples = make_examples(texts, gold, meta)
    lexicon = load_lexicon(recipe.resolve_path(ec.probe_terms) if ec.probe_terms else None)
    probes: dict = {}
    forgetting: dict = {} if ec.forgetting else not_applicable("eval.forgetting is off")
    store = EvalCache(workspace_cache_dir(run_dir), enabled=cache)
    used: dict[str, bool] = {}
    generative: bool | None = None

    for name in systems:
        ts = time.time()
        timer = BatchTimer()
        idx = list(range(len(texts)))
        extra: dict = {}
        if name == "tuned":
            tuned = load_for_inference(run)
            probs = predict_classifier(tuned.model, tuned.tokenizer, texts, ec.batch_size, read_up_to, tuned.dtype,
                                       show_progress, template=spec.template or "{text}", as_chat=spec.as_chat,
                                       system=spec.system_prompt, truncate=spec.truncate, timer=timer,
                                       offsets=tuned.decision, chunks=spec.chunks,
                                       clean=spec.clean).numpy()
            tp = time.time()
            # the probes' unswapped inputs were just scored: their labels are the report's, not read again
            known = {t: labels[j] for t, j in zip(texts, probs.argmax(-1).tolist())}

            def probe_labels(xs: list[str]) -> list[str]:
                todo = [x for x in dict.fromkeys(xs) if x not in known]
                if todo:
                    known.update(zip(todo, [labels[i] for i in predict_classifier(
                        tuned.model, tuned.tokenizer, todo, ec.batch_size, read_up_to, tuned.dtype, False, "probes",
                        template=spec.template or "{text}", as_chat=spec.as_chat, system=spec.system_prompt,
                        truncate=spec.truncate, offsets=tuned.decision, chunks=spec.chunks,
                        clean=spec.clean).argmax(-1).tolist()]))
                return [known[x] for x in xs]

            probes = run_probes(
                "classify", texts, probe_labels,
                ids=[e.id for e in examples], lexicon=lexicon, sample=ec.probe_sample,
                threshold=ec.probe_threshold, seed=seed)
            probes["seconds"] = round(time.time() - tp, 2)
            decision_note(run, notes)
            if ec.forgetting:
                tf = time.time()
                forgetting = forgetting_for_head(run, tuned, ec.forgetting_threshold, seed)
                forgetting["seconds"] = round(time.time() - tf, 2)
            ts += time.time() - tp  # the system's own speed excludes its probes and forgetting check
            del tuned
        elif name in PROMPTED:
            if generative is None:
                generative = _base_is_generative(run.base_model_path())
                if not generative:
                    notes.append(f"base, base_fewshot: {recipe.model} is not a generative model; prompted "
                                 f"scoring skipped")
            if not generative:
                continue
            idx = sample
            sub, sub_gold = [texts[i] for i in idx], [gold[i] for i in idx]

            def compute_prompted(name=name, sub=sub, sub_gold=sub_gold, timer=timer):
                nonlocal base_lm
                t = time.time()
                if base_lm is False:
                    base_lm = _load_base(run, recipe, notes)
                p, ex, st = _prompted(name, base_lm, recipe, labels, sub, sub_gold, read_up_to, timer,
                                      show_progress, seed)
                return {"probs": None if p is None else np.asarray(p, dtype=np.float64).tolist(), "extra": ex,
                        "settings": st, "batches": timer.batches, "seconds": round(time.time() - t, 2)}

            key = _prompted_key(name, run.base_model_path(), run.info.dtype or "float32", recipe, labels, sub,
                                sub_gold, read_up_to)
            value, hit = store.fetch(name, key, compute_prompted)
            probs, extra, settings[name] = value["probs"], value["extra"], value["settings"]
            if probs is None:
                notes.append(f"{name}: {settings.pop(name)['skipped']}")
                continue
        elif name == "tfidf_logreg":
            def compute_tfidf(timer=timer):
                t = time.time()
                recs = _train_records(recipe, labels)
                clf = tfidf_logreg([r.text for r in recs], [r.label for r in recs], seed)
                order = {str(c): j for j, c in enumerate(clf.classes_)}
                p_all = np.zeros((len(texts), len(labels)))
                for i in range(0, len(texts), ec.batch_size):
                    with timer.batch(len(texts[i:i + ec.batch_size])):
                        p = clf.predict_proba(texts[i:i + ec.batch_size])
                    for l, j in order.items():
                        p_all[i:i + ec.batch_size, labels.index(l)] = p[:, j]
                return {"probs": p_all.tolist(), "extra": {}, "batches": timer.batches,
                        "seconds": round(time.time() - t, 2)}

            value, hit = store.fetch(name, _tfidf_key(recipe, labels, texts, test.fingerprint, seed), compute_tfidf)
            probs = value["probs"]
        if name in CACHED:
            used[name] = hit
            if hit:
                # the speed and cost shown are those measured when the result was computed
                timer.batches = [tuple(b) for b in value["batches"]]
                say_reused(name)
        probs = np.asarray(probs, dtype=np.float64)
        pred = [labels[j] for j in probs.argmax(-1)]
        conf = probs.max(-1)
        g = [gold[i] for i in idx]
        m = classification_metrics(g, pred, labels)
        m.update(extra)
        # a cached system's time is its computation's, whether it ran now or was read back
        m["wall_seconds"] = value["seconds"] if name in CACHED else round(time.time() - ts, 2)
        m["records_per_second"] = round(len(idx) / max(1e-9, m["wall_seconds"]), 1)
        if len(idx) < len(texts):
            m["sampled"] = True
        if name in CACHED:
            m["cached"] = used[name]
        results[name] = m
        rows: list[dict | None] = [None] * len(texts)
        for i, l, c in zip(idx, pred, conf):
            rows[i] = {"label": l, "probability": float(c), "correct": l == gold[i]}
        per_example[name] = rows
        calibration[name] = calibration_summary(conf, [l == y for l, y in zip(pred, g)], ec.abstain_below)
        cost[name] = system_cost(timer, ec.price_per_hour, device().type, m["confusion"], costs)

    if len(sample) < len(texts) and any(s in results for s in PROMPTED):
        notes.append(f"{', '.join(s for s in PROMPTED if s in results)}: a stratified sample of {len(sample)} of "
                     f"{len(texts)} test records (seed {seed}, eval.prompted_sample); their metrics, intervals "
                     f"and paired tests are on that sample")
    if any(used.values()):
        notes.append(f"{', '.join(n for n, hit in used.items() if hit)}: predictions read from the eval cache "
                     f"{store.root} (the same model, test records, prompt, reading length, dtype and settings "
                     f"as when computed; their speed is as measured then; `tuneloop eval --no-cache` recomputes)")
    predictions = {n: keyed(examples, ps) for n, ps in per_example.items()}
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
        slices=slice_report("classify", [e.model_dump() for e in examples], predictions, texts, meta=meta,
                            fields=ec.slices, labels=labels, buckets=ec.length_buckets, min_size=ec.slice_min_size,
                            seed=seed, lexicon=lexicon),
        probes=probes,
        forgetting=forgetting,
        wall_seconds=round(time.time() - t0, 2),
        settings=settings,
        calibration=calibration,
        cost=cost,
        cache=cache_summary(used, store.root, cache),
    ).model_dump(mode="json")
    report.update(report_statistics(report, default_pairs(list(results)), seed=seed))
    write_report(report, out_dir or run_dir)
    if print_results:
        print_table(report)
    return report


def _prompted_key(name: str, model_path: str, dtype: str, recipe, labels: list[str], texts: list[str],
                  gold: list[str], read_up_to: int) -> dict | None:
    """Everything that determines `_prompted`'s result (eval/cache.py), or None when the base model has
    no identity to key on (a hub id). `dtype`: the run's, as its info records it ("bfloat16")."""
    identity = model_identity(model_path)
    if identity is None:
        return None
    dc, ec = recipe.data, recipe.eval
    # What was scored, not the test set it was drawn from: a prompted system's answer to a record depends on
    # the record and the settings alone, so the same sample drawn from a test sample of another size (the
    # quickstart's budget sizes it by the machine's speed) reads the stored answers back.
    parts = {"model": identity, "scored": texts_fingerprint(texts, gold),
             "labels": labels, "words": [(ec.verbalizer or {}).get(l, l) for l in labels],
             "prompt": ec.zero_shot_prompt, "system": dc.system_prompt if dc.as_chat else None,
             "max_length": read_up_to, "dtype": dtype, "device": device().type,
             "batch_size": ec.batch_size, "calibrate": ec.calibrate_base,
             "libraries": library_versions("torch", "transformers")}
    if name == "base_fewshot":
        recs = _train_records(recipe, labels)
        parts["shots"] = {"train": texts_fingerprint([r.text for r in recs], [r.label for r in recs]),
                          "k": ec.fewshot_k, "tokens": ec.fewshot_tokens, "seed": recipe.train.seed}
    return parts


def prompted_cache_check(recipe, workspace: Path, dtype: str) -> Callable[[int | None, int | None], bool]:
    """For a classify recipe not yet trained: a function of (test sample, prompted sample) sizes telling whether
    every prompted system in its eval.systems (base, base_fewshot) would be read back from `workspace`'s eval
    cache, with the keys and samples `evaluate_classify` will use (`dtype` as the run will record it). The
    quickstart's budget prices such an evaluation without their time."""
    from ..runs import input_spec
    from ..zoo import resolve_model

    dc, ec = recipe.data, recipe.eval
    names = [s for s in ec.systems if s in PROMPTED]
    store = EvalCache(Path(workspace).joinpath(*CACHE_DIR))
    # the run's labels are its training set's (train/classify.py), and the evaluation reads the test set with them
    labels = load_classification(recipe.resolve_path(dc.train), dc.text_field, dc.label_field, dc.labels,
                                 dc.format).labels
    records = load_classification(recipe.resolve_path(dc.test), dc.text_field, dc.label_field, labels,
                                  dc.format).records
    model_path, read_up_to, seed = resolve_model(recipe.model), input_spec(recipe).max_length, recipe.train.seed

    def cached(n_test: int | None, n_prompted: int | None) -> bool:
        if not names or not store.root.is_dir():
            return False
        recs = [records[i] for i in _sample_indices(records, n_test, seed)]
        sub = [recs[i] for i in _sample_indices(recs, n_prompted, seed)]
        texts, gold = [r.text for r in sub], [r.label for r in sub]
        for name in names:
            key = _prompted_key(name, model_path, dtype, recipe, labels, texts, gold, read_up_to)
            if key is None or store.get(name, key) is None:
                return False
        return True

    return cached


def _tfidf_key(recipe, labels: list[str], texts: list[str], test_fingerprint: str, seed: int) -> dict:
    recs = _train_records(recipe, labels)
    return {"train": texts_fingerprint([r.text for r in recs], [r.label for r in recs]), "labels": labels,
            "test": test_fingerprint, "scored": texts_fingerprint(texts), "seed": seed,
            "libraries": library_versions("scikit-learn", "numpy")}


def _prompted(name: str, base_lm, recipe, labels: list[str], texts: list[str], gold: list[str],
              read_up_to: int, timer, show_progress: bool, seed: int) -> tuple:
    """Class probabilities of the untuned model prompted zero-shot (`base`) or with training examples
    (`base_fewshot`), contextually calibrated when eval.calibrate_base; with the uncalibrated metrics and the
    settings the report shows (the prompt, its examples, the prior divided out)."""
    model, tok, dtype = base_lm
    dc, ec = recipe.data, recipe.eval
    words = [(ec.verbalizer or {}).get(l, l) for l in labels]
    # the same system turn the tuned model reads
    system = dc.system_prompt if dc.as_chat else None
    shots: list[tuple[str, str]] = []
    if name == "base_fewshot":
        recs = _train_records(recipe, labels)
        picked = fewshot_examples(tok, [r.text for r in recs], [r.label for r in recs], labels, ec.fewshot_tokens,
                                  read_up_to, seed, ec.fewshot_k)
        if not picked:
            return None, {}, {"skipped": f"no training example fits eval.fewshot_tokens={ec.fewshot_tokens}"}
        shots = [(t, words[labels.index(l)]) for t, l in picked]

    def score(xs: list[str], t=None, progress: bool = False):
        return predict_zero_shot(model, tok, xs, labels, words, ec.zero_shot_prompt, ec.batch_size, read_up_to,
                                 dtype, progress, system=system, shots=shots, timer=t, desc=f"eval {name}").numpy()

    raw = score(texts, timer, show_progress)
    settings = {"prompt": prompt_shown(tok, ec.zero_shot_prompt, words, read_up_to, system, shots),
                "k": len(shots), "shot_labels": [l for _, l in picked] if shots else [], "n": len(texts)}
    if not ec.calibrate_base:
        settings["calibration"] = None
        return raw, {}, settings
    prior = score(list(CONTENT_FREE)).mean(0)
    probs = contextual_calibration(raw, prior)
    settings.update(calibration="contextual", content_free=list(CONTENT_FREE),
                    content_free_prior={l: float(p) for l, p in zip(labels, prior / prior.sum())})
    pred = [labels[j] for j in raw.argmax(-1)]
    m = classification_metrics(gold, pred, labels)
    # what calibration changed: the model before it often says one label for every input
    return probs, {"uncalibrated_accuracy": m["accuracy"], "uncalibrated_macro_f1": m["macro_f1"],
                   "uncalibrated_predicted": {l: c for l, c in Counter(pred).most_common()}}, settings

