"""Recipe `classify`: a classification head over a pretrained encoder or decoder, LoRA or full.

Reads top to bottom: data (validation held out per label) → model → fit (the shared loop, train/loop.py:
validation, early stopping, checkpoints, exact resume, DDP) → save. The run folder ends up holding the
recipe, the data fingerprint, the adapter (or full weights; the best validation ones when there was
validation), the label map, the loss history and plot, and the training metrics.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
import time
from pathlib import Path

import torch
from rich.console import Console

from ..config import Recipe
from ..data.chat import holdout
from ..data.records import fingerprint
from ..data.validate import load_classification, stratified_sample
from ..fileio import atomic_dir
from ..infer.encode import encode_texts
from ..runs import LOSS_PLOT, MODEL, POOLER, Fingerprints, finish_run, write_data_info, write_history, write_recipe
from ..runs import input_spec, write_decision
from ..zoo import resolve_model
from ..infer.attention import keep_adapter_inputs_bf16
from ..infer.batching import pad_batch, sorted_batches
from ..infer.device import pick_dtype, set_threads
from ..infer.encode import load_tokenizer
from .fastpath import FrozenPrefixCache, compile_blocks, find_blocks, first_trained_block, fuse_lora_linears
from .balance import balanced_rows, describe, fit_decision, label_counts, plan_balance, weighted_share
from .common import plan_steps, plot_losses, recipe_for_run, seed_everything
from .longdoc import ChunkedParts, check_long_inputs, clean_for_training
from .loop import fit

console = Console(stderr=True)
_quiet = Console(quiet=True)  # what processes other than the main one print


def init_head_from_words(model, model_path: str, words: list[str], prompt_end: str = "\n") -> None:
    """Copy the output-embedding rows of each label word's first token into the classification head.

    The token is the one the model would write next after `prompt_end` (the end of the input
    template): after whitespace, as in a chat turn, the bare word; after text such as "Answer:", the
    word with its leading space, which byte-level BPE vocabularies keep as a different token."""
    from transformers import AutoModelForCausalLM

    from ..errors import ConfigError

    head = getattr(model, "score", None)
    if head is None or head.bias is not None:
        raise ConfigError("method.head_init=label_words: needs a decoder classifier (a bias-free `score` head)")
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=head.weight.dtype)
    tok = load_tokenizer(model_path)
    out = lm.get_output_embeddings().weight
    with torch.no_grad():
        for i, w in enumerate(words):
            spaced = w if not prompt_end or prompt_end[-1].isspace() or w[:1].isspace() else " " + w
            ids = tok(spaced, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"eval.verbalizer: label word {w!r} has no tokens")
            head.weight[i] = out[ids[0]].to(head.weight.dtype)
    del lm


def build_classifier(model_path: str, labels: list[str], method, dtype: torch.dtype, pad_id: int,
                     words: list[str] | None = None, prompt_end: str = "\n"):
    """The base model with a fresh head, wrapped with LoRA (or left whole for full fine-tuning)."""
    from transformers import AutoModelForSequenceClassification

    from .common import load_kwargs, wrap_method

    kwargs = load_kwargs(method.name, dtype)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)},
        **kwargs,
    )
    model.config.pad_token_id = pad_id
    # a head reads each input once: without this the forward fills a key/value cache in every layer
    # (copies of all keys and values) and, under train.compile, Dynamo recompiles each block per layer
    model.config.use_cache = False
    if method.head_init == "label_words":
        init_head_from_words(model, model_path, words or labels, prompt_end)
    # LoRA, DoRA, prompt/prefix tuning, QLoRA all go through the shared method builder; `full` passes through.
    return wrap_method(model, method, "SEQ_CLS", model_path)


# Parameters of the new head get their own learning rate (`train.head_lr`).
HEAD_NAMES = ("score", "classifier", "pre_classifier", "lm_head")



def frozen_prefix_cache(model, tc, lengths: list[int], total_steps: int) -> FrozenPrefixCache | None:
    """The frozen-layer cache when it pays and fits (see `train.cache_frozen`), else None."""
    if not tc.cache_frozen or total_steps <= plan_steps(len(lengths), tc)[1]:
        return None  # one epoch or less: nothing is seen twice
    try:
        first = first_trained_block(model)
        if first == 0 or first == len(find_blocks(model)[2]):
            return None  # every block trains, or none does (prompt/prefix tuning change the inputs)
        cache = FrozenPrefixCache(model, first)
    except (TypeError, ValueError) as e:
        console.print(f"frozen-layer cache off: {e}")
        return None
    import psutil

    width = model.config.hidden_size * next(model.parameters()).element_size()
    need, free = sum(lengths) * width, psutil.virtual_memory().available
    if need > free / 2:
        console.print(f"frozen-layer cache off: it would take {need / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free")
        cache.close()
        return None
    console.print(f"frozen-layer cache: blocks 0-{first - 1} run in epoch 1 only ({need / 2**30:.2f} GiB kept)")
    return cache


def stratified_holdout(records, ratio: float, seed: int):
    """(kept, held_out): `holdout` within each label, so the validation split keeps the label shares;
    both keep the records' order. Deterministic for a seed."""
    if ratio <= 0:
        return list(records), []
    by_label: dict[str, list] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    held = {id(r) for label in sorted(by_label) for r in holdout(by_label[label], ratio, seed)[1]}
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


@torch.no_grad()
def validation_scores(model, enc: list[list[int]], ys: list[int], pad_id: int, batch_size: int, dev,
                      autocast: bool) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the validation rows; every process scores all of them."""
    was_training = model.training
    model.eval()
    loss, right = 0.0, 0
    for b in sorted_batches([len(e) for e in enc], batch_size):
        ids, mask = pad_batch([enc[i] for i in b], pad_id)
        y = torch.tensor([ys[i] for i in b], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        right += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return loss / len(enc), right / len(enc)


def imbalance_setup(recipe: Recipe, labels: list[str], enc: list[list[int]], ys: list[int], has_validation: bool,
                    main: bool):
    """(training rows, their labels, the loss's class weights or None, the plan): `train.class_weights`,
    `train.sampler` and `train.decision_rule` resolved against the training labels (train/balance.py), said
    in the log; with the balanced sampler the rows are its seeded draw."""
    tc = recipe.train
    plan = plan_balance(label_counts(ys, labels), tc.class_weights, tc.sampler, tc.decision_rule, recipe.gate.metric,
                        has_validation)
    if main:
        for line in describe(plan):
            console.print(line)
    if plan["sampler"] == "balanced":
        rows = balanced_rows(ys, tc.seed)
        enc, ys = [enc[i] for i in rows], [ys[i] for i in rows]
    w = plan["class_weights"]
    return enc, ys, (torch.tensor([w[l] for l in labels]) if w else None), plan


def train_classifier(recipe: Recipe, run_dir: Path, show_progress: bool = True, resume: bool = False) -> dict:
    from accelerate import Accelerator

    t0 = time.time()
    tc, dc = recipe.train, recipe.data
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = acc.device

    # ---- data: validation held out per label, then the (optional) stratified sample of the rest
    loaded = load_classification(recipe.resolve_path(dc.train), dc.text_field, dc.label_field, dc.labels, dc.format)
    train_recs, val_recs = stratified_holdout(loaded.records, dc.val_ratio, tc.seed + 1)
    if dc.max_train_examples:
        train_recs = stratified_sample(train_recs, dc.max_train_examples, tc.seed)
    labels = loaded.labels
    label_id = {l: i for i, l in enumerate(labels)}
    train_recs, cleaned = clean_for_training(dc.clean, train_recs, console if main else _quiet)
    val_recs, _ = clean_for_training(dc.clean, val_recs, _quiet)

    # ---- model
    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path)
    recipe, long_check = check_long_inputs(recipe, tok, train_recs, console if main else _quiet, val_recs)
    dc = recipe.data
    dtype = pick_dtype(tc.precision, dev)
    words = [(recipe.eval.verbalizer or {}).get(l, l) for l in labels]
    # A chat template ends where the assistant's turn starts (a newline); a plain one where it ends.
    prompt_end = "\n" if dc.as_chat else dc.input_template
    model = build_classifier(model_path, labels, recipe.method, dtype, tok.pad_token_id, words,
                             prompt_end).to(dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    def encode(recs) -> list[list[int]]:
        return encode_texts(tok, [r.text for r in recs], tc.max_length, dc.input_template, dc.as_chat,
                            dc.system_prompt, dc.truncate) if recs else []

    ys, ys_val = [label_id[r.label] for r in train_recs], [label_id[r.label] for r in val_recs]
    chunked = None
    if dc.long_inputs == "chunk":
        chunked = ChunkedParts(model, tok, dc, tc, [r.text for r in train_recs], ys, [r.text for r in val_recs],
                               ys_val, recipe.eval.batch_size, dev, dtype == torch.bfloat16, acc.num_processes)
        enc, enc_val, lengths = chunked.docs, chunked.val_docs, chunked.lengths
    else:
        enc, enc_val = encode(train_recs), encode(val_recs)
        lengths = [len(e) for e in enc]
    if chunked is not None:
        # the sampler draws documents; each keeps its windows and its length in windows' tokens
        rows, ys, weights, balance = imbalance_setup(recipe, labels, list(range(len(enc))), ys, bool(val_recs), main)
        chunked.docs, chunked.ys = [chunked.docs[i] for i in rows], ys
        chunked.lengths = lengths = [chunked.lengths[i] for i in rows]
        chunked.weights = weights
        enc = chunked.docs
    else:
        enc, ys, weights, balance = imbalance_setup(recipe, labels, enc, ys, bool(val_recs), main)
        lengths = [len(e) for e in enc]
    total_steps = plan_steps(len(enc), tc)[2]

    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in HEAD_NAMES)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in HEAD_NAMES)]
    groups = [{"params": body, "lr": tc.lr}]
    if head:
        groups.append({"params": head, "lr": tc.head_lr or tc.lr})
    use_autocast = dtype == torch.bfloat16
    if use_autocast:
        keep_adapter_inputs_bf16(model)
        # measured faster here (bench/classify_throughput.py: +8% tokens/s per unit of peak, -15% memory) but
        # not in SFT's 512-token rows (-12%), so only classification uses it; compiled blocks fuse by themselves
        if not tc.compile:
            fuse_lora_linears(model)
    if tc.compile:
        compile_blocks(model, dynamic=True)  # batches are padded to their own longest review
    # the frozen-layer cache keeps one row per example; a chunked document is several
    cache = frozen_prefix_cache(model, tc, lengths, total_steps) if chunked is None else None
    if main and not resume:
        write_recipe(run_dir, recipe_for_run(recipe))

    # ---- fit: the model's cross-entropy (a mean over my rows), weighted to my share of the global batch
    net = model  # the model itself, never its DDP wrapper: the cache's check runs on one process only

    def forward(m, ids, mask, y=None):
        return m(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=None if y is None else y.to(dev))

    def loss_fn(model, mine: list[int], batch: list[int], cached: bool = True) -> torch.Tensor:
        ids, mask = pad_batch([enc[i] for i in mine], tok.pad_token_id)
        y = torch.tensor([ys[i] for i in mine])
        mode = nullcontext() if cache is None or not cached else cache.around(
            net, mine, mask, lambda extra: forward(net, *pad_batch([enc[i] for i in mine], tok.pad_token_id, extra=extra)).logits,
            console.print)
        with mode:
            if weights is not None:
                return weighted_share(forward(model, ids, mask).logits, y.to(dev), weights, len(batch))
            loss = forward(model, ids, mask, y).loss
        return loss * (len(mine) / len(batch))

    def validate(model) -> tuple[float, str]:
        val, accuracy = validation_scores(model, enc_val, ys_val, tok.pad_token_id, recipe.eval.batch_size, dev,
                                          use_autocast)
        return val, f"validation loss {val:.4f} · accuracy {accuracy:.3f}"

    if chunked is not None:
        loss_fn, validate = chunked.loss_fn, chunked.validate
    fitted = fit(acc, model, groups, tc, lengths, loss_fn, validate if enc_val else None, run_dir, resume,
                 console, autocast=use_autocast, name="train", show_progress=show_progress,
                 strata=[labels[y] for y in ys], val_tokens=sum(len(e) for e in enc_val),
                 # the budget times whole forwards: through the cache, the probe's second sight of a batch ran
                 # the replay check (and, compiled, its eval-mode graphs) inside the timing: the quickstart with
                 # epochs 2 measured 388 tokens/s, trained at 1,155, and was cut to half its reviews
                 probe_loss_fn=None if cache is None else partial(loss_fn, cached=False))
    inner, history = fitted.model, fitted.history
    cache_bytes = cache.nbytes() if cache is not None and not cache.off else None
    if cache is not None:
        cache.close()

    # ---- save: the best validation checkpoint when there was validation, else the last weights (each
    # piece atomically; the folder is complete only once run.json says finished)
    val_loss = val_accuracy = decision = None
    if enc_val and chunked is not None:
        val_loss, val_accuracy = chunked.scores(inner)
    elif enc_val:
        val_loss, val_accuracy = validation_scores(inner, enc_val, ys_val, tok.pad_token_id, recipe.eval.batch_size,
                                                   dev, use_autocast)
    if balance["decision_rule"] != "none":
        decision, line = fit_decision(inner, tok, [r.text for r in val_recs], ys_val, labels, balance["decision_rule"],
                                      input_spec(recipe), recipe.eval.batch_size, dtype, chunks=input_spec(recipe).chunks)
        if main:
            console.print(line)
    if main:
        with atomic_dir(run_dir / MODEL) as tmp:
            inner.save_pretrained(tmp)
        if chunked is not None:
            chunked.save(inner, run_dir / POOLER)
        write_data_info(run_dir, {"train": dc.train, "fingerprint": loaded.fingerprint,
                                  "records": len(loaded.records), "used": len(train_recs),
                                  "val_records": len(val_recs), "labels": labels,
                                  "long_inputs": long_check, "clean": cleaned})
        write_history(run_dir, history, fitted.validations)
        if decision is not None:
            write_decision(run_dir, decision)
        plot_losses(history, fitted.validations, run_dir / LOSS_PLOT)
    metrics = {
        "task": "classify",
        "method": recipe.method.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype).replace("torch.", ""),
        "examples": len(train_recs),
        **fitted.metrics,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "frozen_cache_bytes": cache_bytes,
        "imbalance": balance,
        "decision_rule": balance["decision_rule"] if decision is not None else "none",
        "decision": decision and {"metric": decision["metric"], **decision["validation"]},
        "long_inputs": dc.long_inputs,
        "share_cut": long_check["share_cut"],
        "windows": chunked.windows if chunked is not None else None,
        "trainable_params": trainable,
        "total_params": total_params,
        "wall_seconds": round(time.time() - t0, 2),
    }
    if main:
        finish_run(run_dir, recipe_for_run(recipe), metrics, model_path=model_path, labels=labels,
                   fingerprints=Fingerprints(train=fingerprint(train_recs),
                                             validation=fingerprint(val_recs) if val_recs else None))
    # finish_run removed the checkpoints on the main process; every process leaves together
    acc.wait_for_everyone()
    return metrics
