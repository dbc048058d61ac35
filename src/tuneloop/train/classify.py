"""Recipe `classify`: a classification head over a pretrained encoder or decoder, LoRA or full.

Reads top to bottom: data → model → loop → save. The run folder ends up holding the recipe, the data
fingerprint, the adapter (or full weights), the label map and the training metrics.
"""

from __future__ import annotations

from contextlib import nullcontext
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..config import Recipe
from ..data.validate import load_classification, stratified_sample
from ..fileio import atomic_dir
from ..infer.encode import encode_texts
from ..runs import MODEL, Fingerprints, finish_run, write_data_info, write_history, write_recipe
from ..zoo import resolve_model
from .fastpath import FrozenPrefixCache, compile_blocks, find_blocks, first_trained_block, keep_adapter_inputs_bf16
from .common import (
    load_tokenizer,
    make_scheduler,
    device,
    length_bucketed_batches,
    pad_batch,
    pick_dtype,
    plan_steps,
    progress_columns,
    seed_everything,
    set_threads,
)

console = Console(stderr=True)


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


def train_classifier(recipe: Recipe, run_dir: Path, show_progress: bool = True) -> dict:
    t0 = time.time()
    tc, dc = recipe.train, recipe.data
    set_threads(tc.threads)
    seed_everything(tc.seed)
    dev = device()

    # ---- data
    loaded = load_classification(recipe.resolve_path(dc.train), dc.text_field, dc.label_field, dc.labels, dc.format)
    records = loaded.records
    if dc.max_train_examples:
        records = stratified_sample(records, dc.max_train_examples, tc.seed)
    labels = loaded.labels
    label_id = {l: i for i, l in enumerate(labels)}

    # ---- model
    model_path = resolve_model(recipe.model)
    tok = load_tokenizer(model_path)
    dtype = pick_dtype(tc.precision, dev)
    words = [(recipe.eval.verbalizer or {}).get(l, l) for l in labels]
    # A chat template ends where the assistant's turn starts (a newline); a plain one where it ends.
    prompt_end = "\n" if dc.as_chat else dc.input_template
    model = build_classifier(model_path, labels, recipe.method, dtype, tok.pad_token_id, words,
                             prompt_end).to(dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    enc = encode_texts(tok, [r.text for r in records], tc.max_length, dc.input_template, dc.as_chat,
                       dc.system_prompt, dc.truncate)
    ys = [label_id[r.label] for r in records]
    lengths = [len(e) for e in enc]
    total_steps = plan_steps(len(enc), tc)[2]

    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in HEAD_NAMES)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in HEAD_NAMES)]
    groups = [{"params": body, "lr": tc.lr}]
    if head:
        groups.append({"params": head, "lr": tc.head_lr or tc.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, tc.scheduler, int(tc.warmup_ratio * total_steps), total_steps)
    use_autocast = dtype == torch.bfloat16
    if use_autocast:
        keep_adapter_inputs_bf16(model)
    if tc.compile:
        compile_blocks(model)
    cache = frozen_prefix_cache(model, tc, lengths, total_steps)

    def forward(ids, mask, y=None):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            return model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                         labels=None if y is None else y.to(dev))

    # ---- loop
    model.train()
    history: list[dict] = []
    step, micro, seen_tokens, epoch = 0, 0, 0, 0
    t_train = time.time()
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        task = progress.add_task("train", total=total_steps, info="")
        while step < total_steps:
            for batch in length_bucketed_batches(lengths, tc.batch_size, tc.seed + epoch):
                ids, mask = pad_batch([enc[i] for i in batch], tok.pad_token_id)
                y = torch.tensor([ys[i] for i in batch])
                mode = nullcontext() if cache is None else cache.around(
                    model, batch, mask, lambda: forward(ids, mask).logits, progress.console.print)
                with mode:
                    out = forward(ids, mask, y)
                (out.loss / tc.grad_accum).backward()
                seen_tokens += int(mask.sum())
                micro += 1
                if micro % tc.grad_accum:
                    continue
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss = out.loss.detach().item()
                history.append({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]})
                tps = seen_tokens / max(1e-9, time.time() - t_train)
                progress.update(task, advance=1, info=f"loss {loss:.4f} · {tps:,.0f} tok/s")
                if step >= total_steps:
                    break
            epoch += 1
    train_seconds = time.time() - t_train

    cache_bytes = cache.nbytes() if cache is not None and not cache.off else None
    if cache is not None:
        cache.close()

    # ---- save (each piece atomically; the folder is complete only once run.json says finished)
    model.eval()
    with atomic_dir(run_dir / MODEL) as tmp:
        model.save_pretrained(tmp)
    write_recipe(run_dir, recipe)
    write_data_info(run_dir, {"train": dc.train, "fingerprint": loaded.fingerprint, "records": len(loaded.records),
                              "used": len(records), "labels": labels})
    tail = history[-max(1, len(history) // 10):]
    metrics = {
        "task": "classify",
        "method": recipe.method.name,
        "base_model": recipe.model,
        "model_path": model_path,
        "dtype": str(dtype).replace("torch.", ""),
        "steps": step,
        "examples": len(records),
        "train_tokens": seen_tokens,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(seen_tokens / max(1e-9, train_seconds), 1),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "frozen_cache_bytes": cache_bytes,
        "trainable_params": trainable,
        "total_params": total_params,
        "wall_seconds": round(time.time() - t0, 2),
    }
    write_history(run_dir, history, [])
    finish_run(run_dir, recipe, metrics, model_path=model_path, labels=labels,
               fingerprints=Fingerprints(train=loaded.fingerprint))
    return metrics
