"""Batched inference for every task: class probabilities, standardised regression outputs, per-answer
token losses and greedy answers. Length-sorted batches, no gradient; eval/ and serve/ both call these."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from rich.console import Console
from rich.progress import Progress

from .batching import pad_batch, progress_columns, progress_lines, sorted_batches
from .decision import apply_offsets
from .encode import IGNORE, collate, encode_chat, encode_texts

console = Console(stderr=True)


@torch.no_grad()
def predict_classifier(model, tok, texts: list[str], batch_size: int, max_length: int, dtype: torch.dtype,
                       show_progress: bool = True, desc: str = "eval tuned", template: str = "{text}",
                       as_chat: bool = False, system: str | None = None, truncate: str = "end",
                       timer=None, offsets: list[float] | None = None, chunks=None,
                       clean: str | None = None) -> torch.Tensor:
    """Class probabilities, shape (len(texts), num_labels); inputs built by `encode_texts` from the run's
    input spec (template, chat wrapping, system turn, truncation). `timer`: anything with a `batch(n)`
    context manager (eval/cost.py `BatchTimer`), to time each batch. `offsets`: the run's decision rule
    (`Loaded.decision`, infer/decision.py), applied to the probabilities returned. `clean`: the run's
    cleaning step (data/email.py); `chunks`: the run's chunked reading (anything with `overlap` and
    `max_chunks`, runs.ChunkSpec; the model carries its pooler), None for one truncated window."""
    if clean is not None:
        from ..data.email import clean_text

        texts = [clean_text(clean, t) for t in texts]
    if chunks is not None:
        return apply_offsets(_predict_chunked(model, tok, texts, batch_size, max_length, dtype, show_progress, desc,
                                              template, as_chat, system, timer, chunks), offsets)
    dev = next(model.parameters()).device
    enc = encode_texts(tok, texts, max_length, template, as_chat, system, truncate)
    probs = torch.zeros(len(texts), model.config.num_labels)
    lines = progress_lines(console, show_progress, desc, len(texts))
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        task = progress.add_task(desc, total=len(texts), info="")
        for idx in sorted_batches([len(e) for e in enc], batch_size):
            ids, mask = pad_batch([enc[i] for i in idx], tok.pad_token_id)
            with timer.batch(len(idx)) if timer is not None else nullcontext():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
                probs[idx] = logits.float().softmax(-1).cpu()
            progress.update(task, advance=len(idx))
            if lines is not None:
                lines.advance(len(idx))
    return apply_offsets(probs, offsets)


def _predict_chunked(model, tok, texts, batch_size, max_length, dtype, show_progress, desc, template, as_chat,
                     system, timer, chunks) -> torch.Tensor:
    from .chunks import predict_chunked

    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        task = progress.add_task(desc, total=len(texts), info="")
        return predict_chunked(model, tok, texts, batch_size, max_length, dtype, template, as_chat, system,
                               chunks.overlap, chunks.max_chunks, timer,
                               lambda n: progress.update(task, advance=n))


@torch.no_grad()
def predict_z(model, enc: list[list[int]], pad_id: int, batch_size: int, dev, autocast: bool,
              timer=None) -> list[float]:
    """Standardised predictions, in input order; `timer` as in `predict_classifier`."""
    model.eval()
    out = [0.0] * len(enc)
    for b in sorted_batches([len(e) for e in enc], batch_size):
        ids, mask = pad_batch([enc[i] for i in b], pad_id)
        with timer.batch(len(b)) if timer is not None else nullcontext():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            vals = logits.float().view(-1).tolist()
        for i, v in zip(b, vals):
            out[i] = v
    model.train()
    return out


@torch.no_grad()
def answer_losses(model, tok, conversations: list[list[dict]], max_length: int, batch_size: int,
                  dev) -> list[tuple[float, int]]:
    """(summed NLL, answer tokens) per conversation, answers masked exactly as in training."""
    rows = []
    for msgs in conversations:
        ids, labels = encode_chat(tok, msgs)
        rows.append((ids[:max_length], labels[:max_length], list(range(min(len(ids), max_length)))))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for b in sorted_batches([len(r[0]) for r in rows], batch_size):
        batch = collate([rows[i] for i in b], tok.pad_token_id, packed=False)
        labels = batch.pop("labels")[:, 1:]
        logits = model(**{key: v.to(dev) for key, v in batch.items()}, use_cache=False).logits
        # prompt tuning puts virtual tokens in front: the text's positions are the last ones
        logits = logits[:, -labels.shape[1] - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.to(dev), ignore_index=IGNORE,
                                                reduction="none").sum(-1).cpu()
        counts = (labels != IGNORE).sum(-1)
        for i, v, k in zip(b, nll.tolist(), counts.tolist()):
            out[i] = (v, k)
    return out


@torch.no_grad()
def generate_answers(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, dev,
                     progress=None, label: str = "generate", timer=None) -> list[str]:
    """Greedy answers to each prompt conversation (left-padded batches, longest first); `timer` as in
    `predict_classifier`."""
    enc = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    enc = [list(e["input_ids"]) if isinstance(e, dict) or hasattr(e, "keys") else list(e) for e in enc]
    out = [""] * len(enc)
    task = progress.add_task(label, total=len(enc), info="") if progress is not None else None
    lines = progress_lines(console, progress is not None and not progress.disable, label, len(enc))
    for b in sorted_batches([len(e) for e in enc], batch_size):
        ids, mask = pad_batch([enc[i] for i in b], tok.pad_token_id, left=True)
        with timer.batch(len(b)) if timer is not None else nullcontext():
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for i, row in zip(b, gen[:, ids.shape[1]:].tolist()):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
        if task is not None:
            progress.update(task, advance=len(b))
        if lines is not None:
            lines.advance(len(b))
    return out
