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


READINGS = ("truncate", "middle", "chunk")  # auto's candidates, cheapest first (a tie goes to the cheaper)


def what_is_read(tok, texts: list[str], room: int, reading: str, overlap: int, max_chunks: int) -> list[str]:
    """The part of each text a reading sees: its first `room` tokens (`truncate`), the first and last
    halves of the room (`middle`), or every window's tokens (`chunk`, overlaps once)."""
    from ..infer.chunks import window_spans

    out = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        if reading == "truncate":
            kept = ids[:room]
        elif reading == "middle":
            kept = ids if len(ids) <= room else ids[:room // 2] + ids[len(ids) - (room - room // 2):]
        else:
            kept, upto = [], 0
            for s, e in window_spans(len(ids), room, overlap, max_chunks):
                kept += ids[max(s, upto):e]
                upto = max(upto, e)
        out.append(tok.decode(kept))
    return out


def measure_readings(tok, records, val_records, room: int, dc, seed: int) -> dict[str, float]:
    """Validation macro-F1 of TF-IDF + logistic regression trained and scored on what each reading sees
    (`READINGS`, plus `clean: email` + truncate when the texts are e-mails; that one is reported, never
    applied unasked): a measurement in seconds of where the label evidence is, where training each
    candidate would cost a run each. Without a validation split, a seeded fifth of `records` is held out."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from ..data.email import email_body

    if not val_records:
        import random

        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        held = set(order[: max(1, len(records) // 5)])
        val_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    ys, ys_val = [r.label for r in records], [r.label for r in val_records]
    if len(set(ys)) < 2:
        return {}
    texts, val_texts = [r.text for r in records], [r.text for r in val_records]
    views = {name: name for name in READINGS}
    if dc.clean is None and any(email_body(t)[1]["email"] for t in texts[:50]):
        views["clean: email + truncate"] = "truncate"
    scores = {}
    for name, reading in views.items():
        clean = (lambda xs: [email_body(t)[0] for t in xs]) if name.startswith("clean") else (lambda xs: xs)
        a = what_is_read(tok, clean(texts), room, reading, dc.chunk_overlap, dc.max_chunks)
        b = what_is_read(tok, clean(val_texts), room, reading, dc.chunk_overlap, dc.max_chunks)
        vec = TfidfVectorizer(sublinear_tf=True, min_df=1)
        clf = LogisticRegression(max_iter=1000).fit(vec.fit_transform(a), ys)
        scores[name] = round(float(f1_score(ys_val, clf.predict(vec.transform(b)), average="macro")), 4)
    return scores


def check_long_inputs(recipe, tok, records, console, val_records=()) -> tuple:
    """(recipe with `data.long_inputs` resolved, the check): the share of training texts cut at the reading
    length and where the label evidence goes, said before training when most are cut, with the ways out.
    `auto`, when most are cut, measures each reading on the validation split (`measure_readings`) and takes
    the best (else `truncate`); the log says what it measured and chose."""
    dc, tc = recipe.data, recipe.train
    texts = [r.text for r in records]
    room = text_room(tok, tc.max_length, dc.input_template, dc.as_chat, dc.system_prompt)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    check = long_input_check(texts, [r.label for r in records], lengths, room)
    for line in long_input_lines(check):
        console.print(f"[yellow]{line}[/]" if line.startswith("long inputs") else line)
    if dc.long_inputs == "auto":
        chosen = "truncate"
        if check["most_cut"]:
            scores = measure_readings(tok, records, list(val_records), room, dc, tc.seed)
            check["measured"] = scores
            console.print("data.long_inputs=auto: validation macro-F1 of TF-IDF + LR on what each reading sees: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            applicable = {k: v for k, v in scores.items() if k in READINGS}
            if applicable:
                chosen = max(READINGS, key=lambda k: (applicable.get(k, -1.0), -READINGS.index(k)))
            best_other = max(scores, key=scores.get) if scores else None
            if best_other and best_other not in READINGS and scores[best_other] > applicable.get(chosen, 0):
                console.print(f"  {best_other} reads better still: set it in the recipe (data.clean) to use it")
        console.print(f"data.long_inputs=auto → {chosen} ({check['share_cut']:.0%} of training texts are longer "
                      f"than {room} text tokens)")
        recipe = recipe.model_copy(deep=True)
        recipe.data.long_inputs = chosen if chosen != "middle" else "truncate"
        if chosen == "middle":
            recipe.data.truncate = "middle"
        check["auto_chose"] = chosen
    check["long_inputs"] = recipe.data.long_inputs
    return recipe, check


class ChunkedParts:
    """What `fit` needs for chunked training: each document's windows, its length (all its tokens), the
    loss over a batch of documents, and the validation scores."""

    def __init__(self, model, tok, dc, tc, texts: list[str], ys: list[int], val_texts: list[str],
                 ys_val: list[int], eval_batch: int, dev, autocast: bool, processes: int = 1):
        from ..errors import ConfigError

        if processes > 1:
            # the windows go through the backbone directly, past DDP's forward, which syncs the gradients
            raise ConfigError("data.long_inputs: chunk trains on one process; launch it without "
                              "accelerate launch / torchrun (or use data.long_inputs: truncate)")
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            # virtual tokens are added in PEFT's forward, which the windows bypass
            raise ConfigError("data.long_inputs: chunk works with lora, dora, qlora or full; not with "
                              "prompt_tuning / prefix_tuning")
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
        if getattr(self, "weights", None) is not None:  # train.class_weights (balance.py)
            from .balance import weighted_share

            return weighted_share(logits.float(), y, self.weights.to(logits.device), len(batch))
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
