"""Preference inference: an answer to a prompt as the model's own chat turns (how dpo / kto / reward
training read it), its summed answer log-probability under a causal LM, and its score under a reward
model. Training (train/dpo.py, kto.py, reward.py) and evaluation (eval/) share these, so a run is always
measured on the tokens it was taught with.

A pair (one prompt, two answers) can also be read as ONE row [prompt | chosen | rejected] (`pair_row`):
the rejected answer attends to the prompt and to itself, never to the chosen one (`tree_mask`), and its
position ids restart where the prompt ends, so each answer's log-probability is that of its own
sequence while the prompt is computed once instead of twice (`pair_logps`).
"""

from __future__ import annotations

import torch

from .attention import as_attention_mask
from .batching import sorted_batches
from .encode import IGNORE, collate, encode_chat
from .logprobs import NO_LOGITS, FinalHidden, answer_logps, batch_logps

# segment ids of a pair row's tokens (`pair_row`)
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


def prompt_turns(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    """The turns before the answer: a prompt text as the user turn (after `system`, when given), or
    chat messages as they are."""
    if isinstance(prompt, list):
        return list(prompt)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def encode_answer(tok, prompt: str | list[dict], answer: str, max_length: int,
                  system: str | None = None) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels on the answer tokens only, whether the answer was cut) for `answer` after
    `prompt`, at most `max_length` tokens; None when the prompt alone fills them (never cut a prompt)."""
    ids, labels = encode_chat(tok, prompt_turns(prompt, system) + [{"role": "assistant", "content": answer}])
    if len(ids) <= max_length:
        return ids, labels, False
    first_answer = next((j for j, l in enumerate(labels) if l != IGNORE), len(ids))
    if first_answer >= max_length - 1:
        return None
    return ids[:max_length], labels[:max_length], True


def _first_label(labels: list[int]) -> int:
    return next((j for j, l in enumerate(labels) if l != IGNORE), len(labels))


def pair_row(chosen_ids: list[int], chosen_labels: list[int], rejected_ids: list[int], rejected_labels: list[int]
             ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """(ids, chosen labels, rejected labels, position ids, segment ids) of one row [prompt | chosen | rejected]
    made of a pair's two encoded sequences (`encode_answer`). The prompt is their common start, cut before
    any answer token and one token before the rejected answer's first one: that token is then the rejected
    segment's first, so the answer's first token is predicted inside its own segment (the row's previous
    token is the chosen answer's last). Positions are those of the separate sequences."""
    shared = 0
    for a, b in zip(chosen_ids, rejected_ids):
        if a != b:
            break
        shared += 1
    p = max(0, min(shared, _first_label(chosen_labels), _first_label(rejected_labels) - 1))
    tail = len(rejected_ids) - p
    ids = list(chosen_ids) + list(rejected_ids[p:])
    labels_c = list(chosen_labels) + [IGNORE] * tail
    labels_r = [IGNORE] * len(chosen_ids) + list(rejected_labels[p:])
    pos = list(range(len(chosen_ids))) + list(range(p, len(rejected_ids)))
    seg = [PROMPT] * p + [CHOSEN] * (len(chosen_ids) - p) + [REJECTED] * tail
    return ids, labels_c, labels_r, pos, seg


def collate_pair_rows(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of `pair_row`s: input_ids, position_ids, segments (PAD on pads), chosen_labels,
    rejected_labels, each (B, T)."""
    width = max(len(r[0]) for r in rows)
    shape = (len(rows), width)
    out = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
           "chosen_labels": torch.full(shape, IGNORE, dtype=torch.long),
           "rejected_labels": torch.full(shape, IGNORE, dtype=torch.long),
           "position_ids": torch.arange(width).repeat(len(rows), 1),
           "segments": torch.full(shape, PAD, dtype=torch.long)}
    for k, r in enumerate(rows):
        n = len(r[0])
        for name, v in zip(("input_ids", "chosen_labels", "rejected_labels", "position_ids", "segments"), r):
            out[name][k, :n] = torch.tensor(v)
    return out


def tree_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean, True where a query may see a key: causal, and within the prompt or the query's
    own answer. A pad sees only itself (a fully masked row is NaN in some SDPA kernels); nothing sees a pad."""
    t = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k != PAD) & ((k == PROMPT) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device) & (q == PAD)
    return allowed[:, None]


def pair_logps(model, batch: dict, hidden: FinalHidden, out_weight, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen sums, rejected sums, chosen token counts, rejected token counts) of a `collate_pair_rows`
    batch on the model's device, `attention_mask` its `tree_mask` in the form the model's attention takes
    (`as_attention_mask`). transformers passes a 4-D mask through as it is; no logits are computed."""
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=attention_mask,
          use_cache=False, logits_to_keep=NO_LOGITS.to(batch["input_ids"].device))
    h = hidden.take()
    c, nc = answer_logps(h, out_weight, batch["chosen_labels"])
    r, nr = answer_logps(h, out_weight, batch["rejected_labels"])
    return c, r, nc, nr


def pair_mask_for(model, segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`tree_mask(segments)` in the form `model`'s attention implementation takes, or None where it takes
    no 4-D mask (flash attention): read the pair as two sequences then."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return as_attention_mask(tree_mask(segments), impl, dtype)


def _encode_all(tok, prompts, answers, max_length: int, systems) -> list[tuple[list[int], list[int], list[int]]]:
    if len(prompts) != len(answers):
        from ..errors import ConfigError

        raise ConfigError(f"{len(prompts)} prompts but {len(answers)} answers")
    systems = systems or [None] * len(prompts)
    rows = []
    for p, a, s in zip(prompts, answers, systems):
        enc = encode_answer(tok, p, a, max_length, s)
        if enc is None:  # the prompt fills the room: keep its end, so the answer's first tokens are scored
            ids, labels = encode_chat(tok, prompt_turns(p, s) + [{"role": "assistant", "content": a}])
            first = next((j for j, l in enumerate(labels) if l != IGNORE), len(ids))
            start = max(0, first - max_length // 2)
            ids, labels = ids[start:start + max_length], labels[start:start + max_length]
        else:
            ids, labels, _ = enc
        rows.append((ids, labels, list(range(len(ids)))))
    return rows


def _output_hidden(model):
    """A hook on the decoder's final hidden state and the output matrix, or (None, None) where the PEFT
    method changes the sequence inside its own forward (prompt / prefix tuning): the logits are used then."""
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)) in ("PROMPT_TUNING", "PREFIX_TUNING",
                                                                                  "P_TUNING"):
        return None, None
    try:
        return FinalHidden(model), model.get_output_embeddings().weight
    except (TypeError, AttributeError):
        return None, None


@torch.no_grad()
def sequence_logps(model, tok, prompts: list, answers: list[str], batch_size: int, max_length: int = 1024,
                   systems: list[str | None] | None = None, autocast: bool = False
                   ) -> tuple[list[float], list[int]]:
    """(sum of log p(answer token | prompt, answer so far) over the answer's tokens, answer token count)
    per (prompt, answer), in input order. A prompt is text (the user turn, after its `systems` entry) or
    chat messages. Without full logits (infer/logprobs.py); longest-first batches. For a reference model,
    call it inside `model.disable_adapter()`."""
    dev = next(model.parameters()).device
    rows = _encode_all(tok, prompts, answers, max_length, systems)
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    hidden, weight = _output_hidden(model)
    was_training = model.training
    model.eval()
    try:
        for b in sorted_batches([len(r[0]) for r in rows], batch_size):
            batch = {k: v.to(dev) for k, v in collate([rows[i] for i in b], tok.pad_token_id, packed=False).items()}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                s, n = batch_logps(model, batch, hidden, weight)
            for i, v, k in zip(b, s.tolist(), n.tolist()):
                sums[i], counts[i] = v, k
    finally:
        if hidden is not None:
            hidden.handle.remove()
        model.train(was_training)
    return sums, counts


def reward_inputs(tok, prompts: list, answers: list[str], max_length: int,
                  systems: list[str | None] | None = None) -> list[list[int]]:
    """Token ids a reward model reads for each (prompt, answer): the whole conversation, as training read it."""
    return [r[0] for r in _encode_all(tok, prompts, answers, max_length, systems)]


@torch.no_grad()
def score_ids(model, enc: list[list[int]], pad_id: int, batch_size: int, autocast: bool = False) -> list[float]:
    """The scalar head's output for each token sequence, in input order (right-padded batches)."""
    from .batching import pad_batch

    dev = next(model.parameters()).device
    out = [0.0] * len(enc)
    was_training = model.training
    model.eval()
    try:
        for b in sorted_batches([len(e) for e in enc], batch_size):
            ids, mask = pad_batch([enc[i] for i in b], pad_id)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            for i, v in zip(b, logits.float()[:, 0].tolist()):
                out[i] = v
    finally:
        model.train(was_training)
    return out


def reward_scores(model, tok, prompts: list, answers: list[str], batch_size: int, max_length: int = 1024,
                  systems: list[str | None] | None = None, autocast: bool = False) -> list[float]:
    """A reward model's score of each answer to its prompt (higher = preferred), in input order."""
    return score_ids(model, reward_inputs(tok, prompts, answers, max_length, systems), tok.pad_token_id,
                     batch_size, autocast)
