"""What the preference recipes (dpo.py, kto.py, reward.py) share: the start model (a base, or another run's
model with its adapter merged), answers encoded as chat turns with an answer mask, batches of them, and the
policy's and the reference's answer log-probabilities.

The reference is the policy with its adapter switched off (peft's `disable_adapter()`): no second copy of
the model in memory, and at step 0 (a fresh LoRA adapter is zero) policy and reference agree exactly, so
DPO starts at log 2. Log-probabilities come from the final hidden states on the answer positions only
(infer/logprobs.py); the full B x T x V logits never exist. A pair is read as one row [prompt | chosen |
rejected] with a tree attention mask where the model's attention takes one (`Scorer.pairs`,
infer/preference.py `pair_row`): its prompt is computed once, not twice, by the policy and the reference.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError
from ..infer.encode import IGNORE, collate
from ..infer.logprobs import FinalHidden, batch_logps
from ..infer.preference import collate_pair_rows, encode_answer, pair_logps, pair_mask_for, pair_row
from ..runs import StartPoint
from .common import load_kwargs, wrap_method

# PEFT methods that change the sequence inside their own forward: their log-probs come from the logits.
VIRTUAL_TOKENS = ("prompt_tuning", "prefix_tuning")


def load_policy(start: StartPoint, method, dtype: torch.dtype, task: str):
    """(base after merging the start run's adapters, the model wrapped with a new adapter). The start
    run's adapter is merged rather than trained on: the reference is then exactly the start run's model
    with the new adapter off, and the result is one adapter over (base + merged), like every other run."""
    from transformers import AutoModelForCausalLM

    from ..infer.loaders import merge_adapters

    if method.name == "full":
        raise ConfigError(f"method.name: {task} needs an adapter method (lora, dora, qlora, prompt_tuning, "
                          f"prefix_tuning): its reference is the policy with the adapter switched off, so no "
                          f"second copy of the model is kept")
    base = AutoModelForCausalLM.from_pretrained(start.base, **load_kwargs(method.name, dtype))
    if start.merged:
        base = merge_adapters(base, start.merged)
    return base, wrap_method(base, method, "CAUSAL_LM", start.base)


def answer_hook(base, method):
    """(final-hidden hook, output matrix) for the answer-only log-probs, or (None, None) with virtual tokens."""
    if method.name in VIRTUAL_TOKENS:
        return None, None
    return FinalHidden(base), base.get_output_embeddings().weight


def system_of(r) -> str | None:
    return r.meta.get("system") if isinstance(r.meta.get("system"), str) else None


def encode_answers(tok, records, answers: list[str], max_length: int) -> tuple[list, dict]:
    """One (ids, labels) per record's answer (None where the prompt alone fills `max_length`), and the
    truncation report (how many answers were cut, how many records dropped)."""
    out, cut, dropped, where = [], 0, 0, []
    for r, a in zip(records, answers):
        enc = encode_answer(tok, r.prompt, a, max_length, system_of(r))
        if enc is None:
            dropped += 1
            where.append(r.source)
            out.append(None)
            continue
        cut += enc[2]
        out.append((enc[0], enc[1]))
    return out, {"records": len(records), "truncated": cut, "dropped": dropped, "dropped_examples": where[:5]}


def encode_pairs(tok, records, max_length: int) -> tuple[list[tuple], list[int], dict]:
    """(rows, kept record indices, report): a row is (chosen ids, chosen labels, rejected ids, rejected
    labels) for each pair whose prompt fits in `max_length` with room for both answers."""
    chosen, rep_c = encode_answers(tok, records, [r.chosen for r in records], max_length)
    rejected, rep_r = encode_answers(tok, records, [r.rejected for r in records], max_length)
    rows, kept, where = [], [], []
    for i, (c, rj) in enumerate(zip(chosen, rejected)):
        if c is None or rj is None:
            where.append(records[i].source)
            continue
        rows.append((*c, *rj))
        kept.append(i)
    report = {"records": len(records), "truncated": rep_c["truncated"] + rep_r["truncated"],
              "dropped": len(records) - len(rows), "dropped_examples": where[:5]}
    return rows, kept, report


def read_splits(recipe, task: str, unpaired: bool = False) -> tuple[list, list, list, int]:
    """(train, validation, held-out test, all training-file records) as the recipe splits them: data.test,
    else `data.test_ratio` held out (written to the run folder for eval), then `data.val_ratio` for
    validation; kto reads pairs as two answers each (`unpaired`)."""
    from ..data.chat import holdout
    from ..data.validate import read_preferences

    tc, dc = recipe.train, recipe.data
    res = read_preferences(recipe.resolve_path(dc.train), dc.format, unpaired=unpaired)
    res.raise_if_problems()
    records = res.records
    need_records(records, dc.train, task)
    n_all = len(records)
    if dc.test:
        test_res = read_preferences(recipe.resolve_path(dc.test), dc.format, unpaired=unpaired)
        test_res.raise_if_problems()
        test = test_res.records
    else:
        records, test = holdout(records, dc.test_ratio or 0.0, tc.seed)
    train_recs, val_recs = holdout(records, dc.val_ratio, tc.seed + 1)
    if dc.max_train_examples:
        train_recs = train_recs[: dc.max_train_examples]
    return train_recs, val_recs, test, n_all


def too_short(rows, max_length: int) -> None:
    if not rows:
        raise ConfigError(f"train.max_length: {max_length} tokens is too short for every record's prompt")


def need_records(records, path: str, task: str) -> None:
    if len(records) < 2:
        raise DataError(f"{path}: {len(records)} usable records; {task} needs at least 2")


def seqs(ids_labels: list[tuple[list[int], list[int]]], pad_id: int, dev) -> dict[str, torch.Tensor]:
    """A right-padded batch of (ids, labels) answers on `dev`."""
    batch = collate([(i, l, list(range(len(i)))) for i, l in ids_labels], pad_id, packed=False)
    return {k: v.to(dev) for k, v in batch.items()}


def n_answer_tokens(labels: list[int]) -> int:
    return sum(1 for l in labels[1:] if l != IGNORE)


class Scorer:
    """Summed answer log-probs of a batch under the policy (with gradient) and under the reference (the
    same model with its adapter off, without gradient). `model` is what `fit` trains (DDP-wrapped when
    launched on several processes); the reference runs on the unwrapped model (no gradient, no collective)."""

    def __init__(self, hidden: FinalHidden | None, out_weight):
        self.hidden, self.out_weight = hidden, out_weight

    def policy(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_logps(model, batch, self.hidden, self.out_weight)

    @torch.no_grad()
    def reference(self, inner, batch: dict) -> torch.Tensor:
        with inner.disable_adapter():
            return batch_logps(inner, batch, self.hidden, self.out_weight)[0]

    def pairs(self, model, inner, rows, idx: list[int], pad_id: int, dev):
        """(policy chosen, policy rejected, ref chosen, ref rejected, chosen tokens, rejected tokens) of the
        pairs `idx` of `encode_pairs` rows, each pair read as one `pair_row`; None where that cannot be done
        (virtual tokens change the sequence; the attention takes no 4-D mask)."""
        if self.hidden is None:
            return None
        batch = collate_pair_rows([pair_row(*rows[i]) for i in idx], pad_id)
        mask = pair_mask_for(inner, batch["segments"], self.out_weight.dtype)
        if mask is None:
            return None
        batch = {k: v.to(dev) for k, v in batch.items()}
        mask = mask.to(dev)
        c, r, nc, nr = pair_logps(model, batch, self.hidden, self.out_weight, mask)
        with torch.no_grad(), inner.disable_adapter():
            rc, rr, _, _ = pair_logps(inner, batch, self.hidden, self.out_weight, mask)
        return c, r, rc, rr, nc, nr
