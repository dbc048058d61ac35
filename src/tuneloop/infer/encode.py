"""Model inputs exactly as training built them: text templates (classify), chat turns with an answer mask
(sft), and padded batches of both. Training (train/) and inference (eval/, serve/) share these, so a
model is always read the way it was taught."""

from __future__ import annotations

import torch

from ..errors import ConfigError

IGNORE = -100


def load_tokenizer(model_path: str, chat: bool = False):
    """The tokenizer of `model_path`, with a pad token. `chat`: also demand what chat models need (sft,
    chat serving): a chat template, and a fast tokenizer (character offsets for the answer mask)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        # Decoders often ship without a pad token; any id works because padded positions are masked.
        tok.pad_token = tok.eos_token
    if chat and not tok.chat_template:
        raise ConfigError(f"model {model_path}: its tokenizer has no chat template, which sft needs")
    if chat and not tok.is_fast:
        raise ConfigError(f"model {model_path}: sft needs a fast tokenizer (character offsets for the answer mask)")
    return tok


def chat_wrap(tok, template: str, system: str | None = None) -> str:
    """`template` as the user turn of the tokenizer's chat template, up to where the assistant answers."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError("data.as_chat: this model's tokenizer has no chat template")
    sentinel = "\u2063TEXT\u2063"  # an invisible separator no real template contains
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": template.replace("{text}", sentinel)})
    rendered = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return rendered.replace(sentinel, "{text}")


def encode_texts(tok, texts: list[str], max_length: int, template: str = "{text}",
                 as_chat: bool = False, system: str | None = None, truncate: str = "end") -> list[list[int]]:
    """Token ids of `template` around each text; only the text is truncated, so the instruction around
    it (and the question at the end, where a decoder reads its answer) always survives. `truncate`:
    `end` keeps the start of a long text, `middle` its first and last halves."""
    if as_chat:
        template = chat_wrap(tok, template, system)
    prefix, suffix = template.split("{text}")
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    suf = tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    room = max(1, max_length - len(pre) - len(suf))
    if truncate == "middle":
        head = room // 2
        body = [ids if len(ids) <= room else ids[:head] + ids[len(ids) - (room - head):]
                for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    else:
        body = tok(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    # BOS-style tokens the model expects, if any (a chat template writes its own).
    special = [] if as_chat else tok("", add_special_tokens=True)["input_ids"]
    return [special + pre + b + suf for b in body]


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE except on assistant answers.

    The answer spans are found in the rendered text (prefix with a generation prompt vs prefix with the
    answer), then mapped to tokens through character offsets, so any template works, including ones
    without `{% generation %}` markers. Each answer ends with the EOS token (the template's end-of-turn);
    where a template omits it, it is added, so the model learns when to stop.
    """
    eos = tok.eos_token
    text = tok.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    inserted = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before) or not text.startswith(upto):
            raise ConfigError("the chat template renders a conversation differently from its prefixes; "
                              "the answer mask cannot be derived from it")
        start = len(before)
        at = upto.find(eos, start + len(m["content"].rstrip()) - 1 if m["content"] else start)
        if at >= 0:
            end = at + len(eos)
        else:
            end = len(upto.rstrip())
            text = text[: end + inserted] + eos + text[end + inserted:]
            end += len(eos)
        spans.append((start + inserted, end + inserted))
        if at < 0:
            inserted += len(eos)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s < b for a, b in spans):
            labels[j] = ids[j]
    return ids, labels


def collate(rows, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch. Packed rows get pads as a segment of their own (positions from 0, no labels)
    and no attention mask, so the position ids decide the attention blocks (call the model with
    `use_cache=False`: a cache disables that detection)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r[0])
        ids[k, :n] = torch.tensor(r[0])
        labels[k, :n] = torch.tensor(r[1])
        pos[k, :n] = torch.tensor(r[2]) if packed else torch.arange(n)
        pos[k, n:] = torch.arange(width - n)
        mask[k, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def fit_prompt(tok, messages: list[dict], max_length: int, answer_room: int, truncate: str = "end"
               ) -> tuple[list[dict], int]:
    """`messages` with its longest user turn cut (at token boundaries, `end` keeping the start, `middle` the
    first and last halves) so that the prompt (every turn before the last answer, as the chat template
    renders it) leaves `answer_room` of `max_length` tokens for the answer; and how many tokens were cut.

    For documents (summaries, long tickets) the document is what is cut, never the instruction around it.
    The same function runs in training and evaluation, so the model is scored on the inputs it learned on."""
    prompt = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    rendered = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    n = len(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    over = n - (max_length - answer_room)
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if over <= 0 or not users:
        return messages, 0
    longest = max(users, key=lambda i: len(prompt[i]["content"]))
    content = prompt[longest]["content"]
    start, end = longest_block(content)
    ids = tok(content[start:end], add_special_tokens=False)["input_ids"]
    keep = max(1, len(ids) - over - 2)  # 2: the joint may tokenize into a token or two more
    if truncate == "middle":
        head = keep // 2
        text = tok.decode(ids[:head]).rstrip() + " … " + tok.decode(ids[len(ids) - (keep - head):]).lstrip()
    else:
        text = tok.decode(ids[:keep]).rstrip()
    out = [dict(m) for m in messages]
    out[longest]["content"] = content[:start] + text + content[end:]
    return out, len(ids) - keep


def longest_block(text: str) -> tuple[int, int]:
    """(start, end) of the longest blank-line-separated block of `text`: in a prompt that wraps a document
    in a line of instruction, the document."""
    import re

    spans, at = [], 0
    for m in re.finditer(r"\n\s*\n", text):
        spans.append((at, m.start()))
        at = m.end()
    spans.append((at, len(text)))
    return max(spans, key=lambda se: se[1] - se[0])
