"""Augmentation with a chat model from the zoo (the bundled SmolLM2-135M-Instruct by default).

Methods are data (`METHODS`): each turns a record into a prompt for the model and the model's answer into
a new record. Every new record carries `augmented_from` (written as `"source": "augmented", "origin":
"file:line"`), so splits keep augmented records out of val/test and anyone can trace where they came from.

- paraphrase: the input side (text, first user turn, or preference prompt) rewritten in other words; the
  label, value or answer is kept.
- questions: self-instruct style: the model writes a question that a document answers; the new record is
  a chat pair (question → document). Documents are a record's text, or its assistant answer. Chat inputs
  are written with their originals; other inputs give a file of the new chat pairs alone."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import DataError, NotFoundError
from .progress import progress
from .records import Record

PARAPHRASE_PROMPT = ("Rewrite the following text in different words. Keep its meaning, tone and language. "
                     "Reply with the rewritten text only.\n\nText: {text}")
# Text first, instruction last: the 135M model follows the last line; an instruction before a long text
# gets the text echoed back.
QUESTION_PROMPT = "{text}\n\nWhat question does the text above answer? Write only the question."


def _paraphrase_source(r: Record) -> str | None:
    if r.messages is not None:
        return next((m["content"] for m in r.messages if m["role"] == "user"), None)
    if r.chosen is not None:
        return r.prompt
    return r.text


def _paraphrase_build(r: Record, out: str) -> Record:
    if r.messages is not None:
        i = next(j for j, m in enumerate(r.messages) if m["role"] == "user")
        msgs = [dict(m) for m in r.messages]
        msgs[i]["content"] = out
        return dataclasses.replace(r, messages=msgs)
    if r.chosen is not None:
        return dataclasses.replace(r, prompt=out)
    return dataclasses.replace(r, text=out)


def _document(r: Record) -> str | None:
    if r.messages is not None:
        return next((m["content"] for m in reversed(r.messages) if m["role"] == "assistant"), None)
    if r.chosen is not None:
        return r.chosen
    return r.text


def _question_build(r: Record, out: str) -> Record:
    return Record(messages=[{"role": "user", "content": out}, {"role": "assistant", "content": _document(r)}])


def _first_paragraph(s: str) -> str | None:
    return s.strip().split("\n\n")[0].strip() or None


def _first_question(s: str) -> str | None:
    """Small models wrap the question in chatter ("What a great question! ..."): keep the first sentence
    that is a question."""
    m = re.search(r"[^.!?\n]*\?", s)
    q = m.group().strip() if m else ""
    # "What question does the text answer?" restates the task rather than asking about the document
    if len(q) <= 3 or re.search(r"\b(question|text above|this text|the document)\b", q, re.I):
        return None
    return q


@dataclass(frozen=True)
class Method:
    prompt: str
    source: Callable[[Record], str | None]  # the text the prompt is about
    build: Callable[[Record, str], Record]  # record + model output → new record
    keeps_shape: bool  # True: new records have the input's shape, so originals are written alongside
    extract: Callable[[str], str | None]  # the usable part of the model's answer, or None


METHODS: dict[str, Method] = {
    "paraphrase": Method(PARAPHRASE_PROMPT, _paraphrase_source, _paraphrase_build, True, _first_paragraph),
    "questions": Method(QUESTION_PROMPT, _document, _question_build, False, _first_question),
}


def _clean_output(s: str) -> str:
    s = s.strip()
    for prefix in ("Rewritten text:", "Text:", "Question:", "Here is the rewritten text:"):
        if s.lower().startswith(prefix.lower()):
            s = s[len(prefix):].strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


def augment_records(records: list[Record], method: str, model: str = "smollm2-135m-instruct", n: int = 1,
                    max_new_tokens: int = 96, temperature: float = 0.7, seed: int = 0, batch_size: int = 8,
                    limit: int | None = None, show_progress: bool = False) -> tuple[list[Record], list[dict]]:
    """New records (not the originals) and a log of records skipped and why."""
    if method not in METHODS:
        raise DataError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
    m = METHODS[method]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..zoo import resolve_model

    where = resolve_model(model)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    except (OSError, ValueError) as e:  # not on disk and no network, or not a causal LM
        raise NotFoundError(f"--model {model}: cannot load it ({str(e).splitlines()[0]})") from None
    if tok.chat_template is None:
        raise DataError(f"{model}: the tokenizer has no chat template; augmentation needs an instruct model")
    tok.padding_side = "left"  # generation continues at the right end of every row
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.eval()
    torch.manual_seed(seed)

    todo: list[tuple[Record, str]] = []
    log: list[dict] = []
    for r in records[:limit] if limit else records:
        src = m.source(r)
        if not src or not src.strip():
            log.append({"source": r.source, "action": "skipped", "reason": f"no text for {method}"})
            continue
        todo.extend((r, src) for _ in range(n))
    new: list[Record] = []
    with progress(f"augment ({method})", len(todo), show_progress) as advance:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            prompts = [tok.apply_chat_template([{"role": "user", "content": m.prompt.format(text=src)}],
                                               tokenize=False, add_generation_prompt=True) for _, src in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                # min_new_tokens: an immediate end-of-turn is an empty record, never useful
                gen = lm.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=min(4, max_new_tokens),
                                  do_sample=temperature > 0,
                                  temperature=temperature if temperature > 0 else None, top_p=0.95 if temperature > 0 else None,
                                  pad_token_id=tok.pad_token_id)
            outs = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (r, src), out in zip(chunk, outs):
                out = m.extract(_clean_output(out)) or ""
                if not out or out.strip().lower() == src.strip().lower():
                    log.append({"source": r.source, "action": "skipped",
                                "reason": "no usable answer" if not out else "model repeated the input"})
                    continue
                rec = m.build(r, out)
                new.append(dataclasses.replace(rec, augmented_from=r.source, source=r.source, meta=dict(r.meta)
                                               if m.keeps_shape else {}))
            advance(len(chunk))
    return new, log


def write_augmented(out: str, originals: list[Record], new: list[Record], keep_originals: bool) -> int:
    """Write originals (when kept) then new records to `out` atomically; returns records written.

    `origin` points at the original's line in `out` itself (`out.jsonl:12`), so the file is
    self-contained: a split of it can send each augmented record wherever its original went."""
    from pathlib import Path

    from .records import write_jsonl

    name = Path(out).name
    rows = list(originals) if keep_originals else []
    line_of = {r.source: f"{name}:{i}" for i, r in enumerate(rows, start=1)}
    rows += [dataclasses.replace(r, augmented_from=line_of.get(r.augmented_from, r.augmented_from)) for r in new]
    write_jsonl(out, rows)
    return len(rows)
