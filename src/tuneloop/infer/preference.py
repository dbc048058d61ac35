"""Preference inference: an answer to a prompt as the model's own chat turns (how dpo / kto / reward
training read it), its summed answer log-probability under a causal LM, and its score under a reward
model. Training (train/dpo.py, kto.py, reward.py) and evaluation (eval/) share these, so a run is always
measured on the tokens it was taught with."""

from __future__ import annotations

import torch

from .batching import sorted_batches
from .encode import IGNORE, collate, encode_chat
from .logprobs import FinalHidden, batch_logps


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
