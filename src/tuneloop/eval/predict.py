"""Predictions from the three kinds of system compared in every report.

- `tuned`: a trained classifier run (`infer.predict.predict_classifier`).
- `base`: the untuned instruct model, zero-shot: each label word is scored by its log-likelihood as the
  assistant's answer to a prompt; the likeliest label wins (after contextual calibration, eval/calibration.py).
- `base_fewshot`: the same, with k training examples answered in earlier turns of the prompt
  (`fewshot_examples` picks them: balanced across labels, seeded, as many as fit a token budget).
- `tfidf_logreg`: the classical baseline a data scientist would try first.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from rich.console import Console
from rich.progress import Progress

from ..infer.batching import pad_batch, progress_columns, progress_lines, sorted_batches

console = Console(stderr=True)


def _choices(words: list[str]) -> str:
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def _shorten(tok, text: str, max_length: int) -> str:
    # Truncate the text, not the instruction around it.
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:max_length])


def _messages(tok, text: str, prompt: str, words: list[str], max_length: int, system: str | None,
              shots: list[tuple[str, str]]) -> list[dict]:
    choices = _choices(words)
    msgs = [{"role": "system", "content": system}] if system else []
    for shot_text, shot_word in shots:
        msgs.append({"role": "user", "content": prompt.format(text=_shorten(tok, shot_text, max_length),
                                                             choices=choices)})
        msgs.append({"role": "assistant", "content": shot_word})
    msgs.append({"role": "user", "content": prompt.format(text=_shorten(tok, text, max_length), choices=choices)})
    return msgs


def render_prompt(tok, msgs: list[dict], tokenize: bool):
    """The chat-formatted prompt up to where the assistant's answer starts (ids, or the text); a model
    without a chat template reads the user turns and answers as plain text (no system turn, as before)."""
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=tokenize,
                                      **({"return_dict": True} if tokenize else {}))
        return list(out["input_ids"]) if tokenize else out
    parts = []
    for m in msgs:
        if m["role"] == "assistant":
            parts[-1] += f" {m['content']}\n"
        elif m["role"] == "user":
            parts.append(m["content"] + "\nAnswer:")
    text = "\n".join(parts)
    return list(tok(text)["input_ids"]) if tokenize else text


def zero_shot_prompts(tok, texts: list[str], prompt: str, words: list[str], max_length: int,
                      system: str | None = None, shots: list[tuple[str, str]] = ()) -> list[list[int]]:
    """Token ids of the chat-formatted prompt up to where the assistant's answer starts; `shots`
    ((text, answer word) pairs) are answered in earlier turns."""
    return [render_prompt(tok, _messages(tok, t, prompt, words, max_length, system, list(shots)), True)
            for t in texts]


def prompt_shown(tok, prompt: str, words: list[str], max_length: int, system: str | None = None,
                 shots: list[tuple[str, str]] = ()) -> str:
    """The prompt as the model reads it, with `{text}` where each test input goes (for the report)."""
    msgs = _messages(tok, "\x00", prompt, words, max_length, system, list(shots))
    msgs[-1]["content"] = prompt.format(text="{text}", choices=_choices(words))
    return render_prompt(tok, msgs, False)


def fewshot_examples(tok, texts: list[str], labels_of: list[str], labels: list[str], budget: int,
                     max_length: int, seed: int, k: int | None = None,
                     max_rounds: int = 4) -> list[tuple[str, str]]:
    """Training examples for a few-shot prompt: one per label in turn (each label's order shuffled with
    `seed`), as many whole rounds as fit `budget` tokens of text (each text read up to `max_length`) up to
    `max_rounds` (more examples of short texts cost time and rarely help a small model), or exactly `k`
    when given (still in label turns). Returned as (text, label), in prompt order."""
    import random

    rng = random.Random(seed)
    pools = {l: [t for t, y in zip(texts, labels_of) if y == l] for l in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    order = [l for l in labels if pools[l]]
    out: list[tuple[str, str]] = []
    used, rounds = 0, 0
    while True:
        batch = [(pools[l][rounds], l) for l in order if rounds < len(pools[l])]
        if not batch:
            break
        if k is not None:
            batch = batch[: k - len(out)]
        elif rounds >= max_rounds:
            break
        else:
            cost = sum(min(max_length, len(tok(t, add_special_tokens=False)["input_ids"])) for t, _ in batch)
            if used + cost > budget:
                break
            used += cost
        out += batch
        rounds += 1
        if k is not None and len(out) >= k:
            break
    # a seeded random order, so no label is always the one shown last (the answer leans to it)
    rng.shuffle(out)
    return out


# Below this many shared tokens a separate prefix forward costs more than it saves.
MIN_SHARED_PREFIX = 8


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (the system turn, the few-shot examples, the
    instruction up to the text), leaving each at least one token of its own."""
    if not prompts:
        return 0
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


@torch.no_grad()
def predict_zero_shot(model, tok, texts: list[str], labels: list[str], words: list[str], prompt: str,
                      batch_size: int, max_length: int, dtype: torch.dtype,
                      show_progress: bool = True, system: str | None = None,
                      shots: list[tuple[str, str]] = (), timer=None, desc: str = "eval base",
                      reuse_prefix: bool = True) -> torch.Tensor:
    """Softmax over the labels' answer log-likelihoods, shape (len(texts), len(labels)); `shots` as in
    `zero_shot_prompts`, `timer` as in infer/predict.py `predict_classifier`.

    `reuse_prefix`: the tokens every prompt shares (with few-shot examples, most of each prompt) are read
    once and their keys and values reused for every input, instead of being re-read per input; the scores
    equal those of reading each prompt whole (tests/test_eval_speed.py), up to float rounding."""
    dev = next(model.parameters()).device
    prompts = zero_shot_prompts(tok, texts, prompt, words, max_length, system, shots)
    word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    scores = torch.zeros(len(texts), len(labels))
    single = all(len(w) == 1 for w in word_ids)
    n_shared = shared_prefix(prompts) if reuse_prefix else 0
    prefix = None
    if n_shared >= MIN_SHARED_PREFIX:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            prefix = decoder(input_ids=torch.tensor([prompts[0][:n_shared]], device=dev),
                             use_cache=True).past_key_values
        prompts = [p[n_shared:] for p in prompts]
    else:
        n_shared = 0
    lines = progress_lines(console, show_progress, desc, len(texts))
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        task = progress.add_task(desc, total=len(texts), info=f"{len(shots)}-shot" if shots else "zero-shot")
        for idx in sorted_batches([len(p) for p in prompts], batch_size):
            with timer.batch(len(idx)) if timer is not None else nullcontext():
                _score_batch(model, tok, prompts, idx, word_ids, single, scores, dtype, dev, decoder, head,
                             prefix, n_shared)
            progress.update(task, advance=len(idx))
            if lines is not None:
                lines.advance(len(idx))
    return scores.softmax(-1)


def _hidden(decoder, seqs: list[list[int]], pad_id: int, dev, prefix, n_shared: int, left: bool) -> torch.Tensor:
    """The decoder's last hidden states (B, T, d) of `seqs`, padded (left or right); with `prefix` (the
    shared prefix's key/value cache, `n_shared` tokens) they continue it: right-padded after it, their
    positions counted from its end."""
    import copy

    if prefix is None:
        ids, mask = pad_batch(seqs, pad_id, left=left)
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if left else None
        return decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                       position_ids=None if pos is None else pos.to(dev)).last_hidden_state
    ids, mask = pad_batch(seqs, pad_id)
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(len(seqs))
    full = torch.cat([torch.ones(len(seqs), n_shared, dtype=mask.dtype), mask], 1)
    pos = torch.arange(n_shared, n_shared + ids.shape[1])[None].expand(len(seqs), -1)
    return decoder(input_ids=ids.to(dev), attention_mask=full.to(dev), position_ids=pos.to(dev),
                   past_key_values=cache, use_cache=True).last_hidden_state


def _score_batch(model, tok, prompts, idx, word_ids, single, scores, dtype, dev, decoder, head,
                 prefix=None, n_shared: int = 0) -> None:
    """Each label's answer log-likelihood for the prompts `idx`, into `scores` (`prefix`: see `_hidden`)."""
    if single:
        # One forward per prompt: the next-token distribution scores every one-token label.
        seqs = [prompts[i] for i in idx]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            h = _hidden(decoder, seqs, tok.pad_token_id, dev, prefix, n_shared, left=True)
            # left-padded: every prompt ends at the last position; after a prefix: right-padded
            last = torch.tensor([len(s) - 1 for s in seqs], device=h.device) if prefix is not None else None
            h = h[:, -1] if last is None else h[torch.arange(len(seqs), device=h.device), last]
            logp = head(h).float().log_softmax(-1).cpu()
        scores[idx] = logp[:, [w[0] for w in word_ids]]
        return
    # Multi-token labels: score prompt+label for each label; only the label positions
    # go through the vocabulary projection.
    for li, w in enumerate(word_ids):
        seqs = [prompts[i] + w for i in idx]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            h = _hidden(decoder, seqs, tok.pad_token_id, dev, prefix, n_shared, left=False)
            for r, i in enumerate(idx):
                start = len(prompts[i]) - 1
                lp = head(h[r, start:start + len(w)]).float().log_softmax(-1).cpu()
                scores[i, li] = lp[torch.arange(len(w)), torch.tensor(w)].sum()


def tfidf_logreg(train_texts: list[str], train_labels: list[str], seed: int = 0):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    return pipe.fit(train_texts, train_labels)
