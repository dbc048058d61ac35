"""Long documents in the classify recipe: the cleaning step, the long-input warning (and `auto`'s choice),
and chunked training (windows pooled into one prediction, the gradient through every window). Kept apart
from train/classify.py, which calls these in its data, fit and save sections."""

from __future__ import annotations

from collections import Counter

import torch

from ..data.clean import map_text
from ..data.email import CLEANERS
from ..data.longdoc import long_input_check, long_input_lines
from ..infer.chunks import attach_pooler, chunked_logits, encode_windows, save_pooler
from ..infer.encode import chat_wrap
from ..infer.batching import sorted_batches


def clean_for_training(step: str | None, records: list, console) -> tuple[list, dict | None]:
    """`records` through the recipe's cleaning step (`data.clean`), and what it did (None: no step). Never
    silent: the log says how many texts changed and what was removed."""
    if step is None:
        return records, None
    fn = CLEANERS[step]
    out, stats = [], Counter()
    for r in records:
        info: dict = {}

        def apply(text: str) -> str:
            cleaned, what = fn(text)
            info.update(what)
            return cleaned

        out.append(map_text(r, apply))
        if info.get("email"):
            stats["emails"] += 1
            for k in ("header_lines", "quoted_lines", "signature_lines", "chars_before", "chars_after"):
                stats[k] += info[k]
    summary = {"step": step, "records": len(records), **stats}
    console.print(f"data.clean={step}: {stats['emails']} of {len(records)} texts were e-mails, cut to subject + body "
                  f"({stats['header_lines']} header lines, {stats['quoted_lines']} quoted lines, "
                  f"{stats['signature_lines']} signature lines removed; {stats['chars_before']:,} → "
                  f"{stats['chars_after']:,} characters)")
    return out, summary


def text_room(tok, max_length: int, template: str, as_chat: bool, system: str | None) -> int:
    """Text tokens a `max_length` input has room for around the template (as `encode_texts` computes it)."""
    if as_chat:
        template = chat_wrap(tok, template, system)
    prefix, suffix = template.split("{text}")
    frame = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in (prefix, suffix) if s)
    return max(1, max_length - frame)


def check_long_inputs(recipe, tok, records, console) -> tuple:
    """(recipe with `data.long_inputs` resolved, the check): the share of training texts cut at the reading
    length and where the label evidence goes, said before training when most are cut, with the ways out;
    `auto` becomes `chunk` when most are cut, else `truncate`, and the log says which."""
    dc, tc = recipe.data, recipe.train
    texts = [r.text for r in records]
    room = text_room(tok, tc.max_length, dc.input_template, dc.as_chat, dc.system_prompt)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    check = long_input_check(texts, [r.label for r in records], lengths, room)
    for line in long_input_lines(check):
        console.print(f"[yellow]{line}[/]" if line.startswith("long inputs") else line)
    if dc.long_inputs == "auto":
        chosen = "chunk" if check["most_cut"] else "truncate"
        console.print(f"data.long_inputs=auto → {chosen} ({check['share_cut']:.0%} of training texts are longer "
                      f"than {room} text tokens)")
        recipe = recipe.model_copy(deep=True)
        recipe.data.long_inputs = chosen
        check["auto_chose"] = chosen
    check["long_inputs"] = recipe.data.long_inputs
    return recipe, check


class ChunkedParts:
    """What `fit` needs for chunked training: each document's windows, its length (all its tokens), the
    loss over a batch of documents, and the validation scores."""

    def __init__(self, model, tok, dc, tc, texts: list[str], ys: list[int], val_texts: list[str],
                 ys_val: list[int], eval_batch: int, dev, autocast: bool):
        self.pooler = attach_pooler(model, dc.chunk_pooling)
        self.pad_id, self.dev, self.autocast, self.eval_batch = tok.pad_token_id, dev, autocast, eval_batch
        enc = lambda xs: encode_windows(tok, xs, tc.max_length, dc.input_template, dc.as_chat, dc.system_prompt,
                                        dc.chunk_overlap, dc.max_chunks) if xs else []
        self.docs, self.val_docs = enc(texts), enc(val_texts)
        self.ys, self.ys_val = ys, ys_val
        self.lengths = [sum(len(w) for w in d) for d in self.docs]
        self.windows = sum(len(d) for d in self.docs)

    def loss_fn(self, model, mine: list[int], batch: list[int]) -> torch.Tensor:
        logits = chunked_logits(model, [self.docs[i] for i in mine], self.pad_id)
        y = torch.tensor([self.ys[i] for i in mine], device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), y) * (len(mine) / len(batch))

    @torch.no_grad()
    def scores(self, model) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over the validation documents."""
        was_training = model.training
        model.eval()
        loss, right = 0.0, 0
        per_batch = max(1, self.eval_batch // max(1, max(len(d) for d in self.val_docs)))
        for b in sorted_batches([sum(len(w) for w in d) for d in self.val_docs], per_batch):
            y = torch.tensor([self.ys_val[i] for i in b], device=self.dev)
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = chunked_logits(model, [self.val_docs[i] for i in b], self.pad_id).float()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            right += int((logits.argmax(-1) == y).sum())
        model.train(was_training)
        return loss / len(self.val_docs), right / len(self.val_docs)

    def validate(self, model) -> tuple[float, str]:
        val, accuracy = self.scores(model)
        return val, f"validation loss {val:.4f} · accuracy {accuracy:.3f}"

    def save(self, model, path) -> None:
        """The pooler beside the adapter, when it has parameters (attention), written atomically."""
        if self.pooler.query is None:
            return
        save_pooler(model, path)
