"""Chunked reading of long documents: the text split into overlapping token windows, each read by the
classifier's backbone, the windows' representations pooled into one document representation, and the
classification head applied to that. Training (train/classify.py) and inference (eval/, serve/) both use
these, so a document is read the same way everywhere.

A window is the recipe's input template around a slice of the text's tokens: every window carries the
instruction and the question, so each is a well-formed input on its own. A window's representation is
the backbone's last hidden state at its last real token (where a decoder classifier reads its answer);
the pooled representation goes through the model's own head, so one window pools to exactly what the
unchunked model computes for that input.

Poolings (`POOLINGS`): `mean` and `max` (elementwise over the windows) have no parameters; `attention`
learns one scoring vector (softmax over the windows' scores weights their mean); it starts at zero, i.e.
as `mean`, and is saved in the run folder beside the adapter (`save_pooler` / `load_pooler`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import ConfigError
from .batching import pad_batch, sorted_batches
from .encode import chat_wrap

POOLINGS = ("mean", "max", "attention")


def window_spans(n: int, size: int, overlap: int, max_chunks: int) -> list[tuple[int, int]]:
    """(start, end) token spans of the windows over a text of `n` tokens: `size` tokens each, each
    starting `size - overlap` after the one before, until one reaches the end (the last may be shorter).
    Past `max_chunks`, the first `max_chunks - 1` windows are kept and the last one is the final `size`
    tokens, so the start and the end of a long text are always read (as `data.truncate: middle` does)."""
    if size < 1 or not 0 <= overlap < size:
        raise ConfigError(f"data.chunk_overlap: {overlap} must be at least 0 and below the window's "
                          f"{size} text tokens")
    if max_chunks < 1:
        raise ConfigError(f"data.max_chunks: {max_chunks} must be at least 1")
    if n <= size:
        return [(0, n)]
    stride = size - overlap
    spans = []
    start = 0
    while True:
        spans.append((start, min(start + size, n)))
        if start + size >= n:
            break
        start += stride
    if len(spans) > max_chunks:
        spans = spans[: max_chunks - 1] + [(n - size, n)] if max_chunks > 1 else [(0, size)]
    return spans


def encode_windows(tok, texts: list[str], max_length: int, template: str = "{text}", as_chat: bool = False,
                   system: str | None = None, overlap: int = 32, max_chunks: int = 8) -> list[list[list[int]]]:
    """Per text, the token ids of each window: `template` around a slice of the text, every window at
    most `max_length` tokens in all (the text gets the room the template leaves, as in `encode_texts`)."""
    if as_chat:
        template = chat_wrap(tok, template, system)
    prefix, suffix = template.split("{text}")
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    suf = tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    room = max(1, max_length - len(pre) - len(suf))
    special = [] if as_chat else tok("", add_special_tokens=True)["input_ids"]
    out = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        out.append([special + pre + ids[s:e] + suf for s, e in window_spans(len(ids), room, overlap, max_chunks)])
    return out


class WindowPooler(torch.nn.Module):
    """Pools the windows of each document into one representation (see the module doc)."""

    def __init__(self, hidden: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"data.chunk_pooling: unknown pooling {pooling!r} (known: {', '.join(POOLINGS)})")
        self.pooling = pooling
        self.query = torch.nn.Parameter(torch.zeros(hidden)) if pooling == "attention" else None

    def forward(self, states: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`states` (sum(counts), hidden): the windows of document 0, then document 1, ...; returns
        (len(counts), hidden)."""
        out = []
        for h in torch.split(states, counts):
            if self.pooling == "mean":
                out.append(h.mean(0))
            elif self.pooling == "max":
                out.append(h.max(0).values)
            else:
                w = torch.softmax(h.float() @ self.query.float(), 0).to(h.dtype)
                out.append((w[:, None] * h).sum(0))
        return torch.stack(out)


def _parts(model):
    """(backbone, head) of a decoder sequence classifier, through a PEFT wrapper if there is one."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(hf, "score", None)
    backbone = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
    if head is None or backbone is None:
        raise ConfigError("data.long_inputs: chunk needs a decoder classifier (a model with a `score` head over "
                          f"its backbone); {type(hf).__name__} has none")
    return backbone, head


def attach_pooler(model, pooling: str) -> WindowPooler:
    """A fresh pooler put on `model` as its submodule `window_pooler`, so it trains (and is checkpointed,
    restored to the best validation state) with the model's other trainable parameters."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = next(model.parameters()).device
    pooler = WindowPooler(hf.config.hidden_size, pooling).to(dev)
    model.window_pooler = pooler
    return pooler


def window_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(windows, hidden): each right-padded window's last hidden state at its last real token."""
    backbone, _ = _parts(model)
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    last = mask.sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def chunked_logits(model, windows: list[list[list[int]]], pad_id: int) -> torch.Tensor:
    """(documents, labels) logits: every window of every document in one padded batch through the
    backbone, pooled per document by `model.window_pooler`, then the model's head. The gradient reaches
    every window of every document."""
    _, head = _parts(model)
    dev = next(model.parameters()).device
    flat = [w for doc in windows for w in doc]
    ids, mask = pad_batch(flat, pad_id)
    states = window_states(model, ids.to(dev), mask.to(dev))
    return head(model.window_pooler(states, [len(doc) for doc in windows]))


@torch.no_grad()
def predict_chunked(model, tok, texts: list[str], batch_size: int, max_length: int, dtype: torch.dtype,
                    template: str = "{text}", as_chat: bool = False, system: str | None = None,
                    overlap: int = 32, max_chunks: int = 8, timer=None, progress=None) -> torch.Tensor:
    """Class probabilities (len(texts), labels) for chunked reading. A batch holds about `batch_size`
    windows (whole documents, longest first); `progress(n)` is told of each document done."""
    dev = next(model.parameters()).device
    docs = encode_windows(tok, texts, max_length, template, as_chat, system, overlap, max_chunks)
    probs = torch.zeros(len(texts), model.config.num_labels)
    per_batch = max(1, batch_size // max_chunks)
    for idx in sorted_batches([sum(len(w) for w in d) for d in docs], per_batch):
        with timer.batch(len(idx)) if timer is not None else nullcontext():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = chunked_logits(model, [docs[i] for i in idx], tok.pad_token_id)
            probs[idx] = logits.float().softmax(-1).cpu()
        if progress is not None:
            progress(len(idx))
    return probs


def save_pooler(model, path: Path) -> None:
    """The pooler's parameters (only `attention` has any) as safetensors, written atomically."""
    from safetensors.torch import save

    from ..fileio import write_bytes_atomic

    write_bytes_atomic(path, save({k: v.detach().float().cpu().contiguous()
                                   for k, v in model.window_pooler.state_dict().items()}))


def load_pooler(model, pooling: str, path: Path | None) -> WindowPooler:
    """`model` with its pooler back (`path`: the saved parameters; None for the parameter-free poolings)."""
    pooler = attach_pooler(model, pooling)
    if path is not None and Path(path).exists():
        from safetensors.torch import load_file

        pooler.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in load_file(str(path)).items()})
    elif pooling == "attention":
        raise ConfigError(f"{path}: missing; an attention-pooled run keeps its pooler there")
    pooler.eval()
    return pooler
