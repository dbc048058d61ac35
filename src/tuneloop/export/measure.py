"""What an export changes, measured: the same inputs through the unexported run and through the exported
model, compared output by output. Used by every export (the deltas in its model card) and by
`bench/export_formats.py` (the same scores on the whole test set, with load time and speed).

Inputs are built the way the run reads them (`runs.InputSpec` for heads, the chat template for
generation), so a difference is the export's, never the encoding's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.chat import load_chat
from ..infer.batching import pad_batch, sorted_batches
from ..infer.encode import IGNORE, collate, encode_chat, encode_texts
from ..runs import TEST_RECORDS, Run

GENERATION = ("sft", "dpo", "kto")  # causal LMs: scored by their next-token predictions on answers


@dataclass
class Probes:
    """Inputs to score a model on: texts (heads; labels when known) or conversations (generation)."""

    task: str
    texts: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    conversations: list[list[dict]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.conversations) if self.task in GENERATION else len(self.texts)


def _conversation(r) -> list[dict]:
    """A record as the conversation a causal LM is scored on (sft messages; a preference pair's chosen
    answer; a kto completion)."""
    if r.messages:
        return r.messages
    return [{"role": "user", "content": r.prompt or ""}, {"role": "assistant", "content": r.chosen or r.completion or ""}]


def probes(run: Run, limit: int | None = 16) -> Probes:
    """The run's own test records (its `data.test`, else the split it held out in `test.jsonl`, else its
    training data), the first `limit` (None: all)."""
    from ..data.validate import load_classification, read_records

    dc = run.recipe.data
    if run.task == "classify":
        path = run.recipe.resolve_path(dc.test or dc.train)
        recs = load_classification(path, dc.text_field, dc.label_field, dc.labels, dc.format).records[:limit]
        return Probes(run.task, texts=[r.text for r in recs], labels=[r.label for r in recs], source=str(path))
    if run.task not in GENERATION:
        from ..errors import ConfigError

        raise ConfigError(f"{run.dir}: a {run.task} run; exports are measured on classify, {', '.join(GENERATION)} runs")
    f = run.dir / TEST_RECORDS
    if dc.test:
        path = run.recipe.resolve_path(dc.test)
        recs = load_chat(path, dc.format)
    elif f.exists() and f.read_text().strip():
        path, recs = f, read_records(str(f)).records
    else:
        path = run.recipe.resolve_path(dc.train)
        recs = load_chat(path, dc.format)
    return Probes(run.task, conversations=[_conversation(r) for r in recs][:limit], source=str(path))


@dataclass
class Scores:
    """One model's outputs on the probes. Heads: `outputs` (rows x outputs: probabilities, or the raw
    value for one-output heads). Generation: the argmax and the NLL of every answer token, in order."""

    argmax: list[int]
    outputs: torch.Tensor | None = None
    nll: list[float] | None = None


@torch.no_grad()
def score(model, tok, run: Run, p: Probes, dev: torch.device | None = None, autocast: bool = False,
          batch_size: int = 8) -> Scores:
    """`model`'s outputs on the probes, inputs built exactly as the run reads them."""
    dev = dev or next(model.parameters()).device
    spec = run.info.input
    if p.task in GENERATION:
        rows = []
        for msgs in p.conversations:
            ids, labels = encode_chat(tok, msgs)
            n = min(len(ids), spec.max_length)
            rows.append((ids[:n], labels[:n], list(range(n))))
        argmax: list[list[int]] = [[] for _ in rows]
        nll: list[list[float]] = [[] for _ in rows]
        for b in sorted_batches([len(r[0]) for r in rows], batch_size):
            batch = collate([rows[i] for i in b], tok.pad_token_id, packed=False)
            labels = batch.pop("labels")[:, 1:]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(**{k: v.to(dev) for k, v in batch.items()}, use_cache=False).logits
            logits = logits[:, -labels.shape[1] - 1:-1].float().cpu()
            tok_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                        reduction="none")
            for j, i in enumerate(b):
                keep = labels[j] != IGNORE
                argmax[i] = logits[j].argmax(-1)[keep].tolist()
                nll[i] = tok_nll[j][keep].tolist()
        return Scores(argmax=[a for row in argmax for a in row], nll=[v for row in nll for v in row])
    enc = encode_texts(tok, p.texts, spec.max_length, spec.template or "{text}", spec.as_chat, spec.system_prompt,
                       spec.truncate)
    out = None
    for b in sorted_batches([len(e) for e in enc], batch_size):
        ids, mask = pad_batch([enc[i] for i in b], tok.pad_token_id)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
        vals = logits.softmax(-1) if logits.shape[-1] > 1 else logits
        if out is None:
            out = torch.zeros(len(enc), vals.shape[-1])
        out[b] = vals
    out = out if out is not None else torch.zeros(0, 1)
    return Scores(argmax=out.argmax(-1).tolist(), outputs=out)


def quality(s: Scores, p: Probes, labels: list[str] | None) -> dict:
    """The task's quality on the probes: accuracy and macro F1 (classify, when the probes have labels),
    perplexity of the reference answers (generation)."""
    if s.nll is not None:
        return {"perplexity": math.exp(sum(s.nll) / max(1, len(s.nll)))}
    if labels and p.labels and all(x is not None for x in p.labels):
        from sklearn.metrics import f1_score

        truth = [labels.index(x) if x in labels else -1 for x in p.labels]
        acc = sum(int(a == t) for a, t in zip(s.argmax, truth)) / max(1, len(truth))
        return {"accuracy": acc, "macro_f1": float(f1_score(truth, s.argmax, average="macro", zero_division=0))}
    return {}


def compare(ref: Scores, new: Scores) -> dict:
    """How far `new` is from `ref`: argmax agreement (share of inputs, or of answer tokens, where the top
    prediction is the same), the largest output difference (heads) or the perplexity change (generation)."""
    n = min(len(ref.argmax), len(new.argmax))
    agree = sum(int(a == b) for a, b in zip(ref.argmax, new.argmax)) / max(1, n)
    out = {"agreement": agree, "n": n}
    if ref.outputs is not None and new.outputs is not None and ref.outputs.numel():
        out["max_abs_diff"] = float((ref.outputs - new.outputs).abs().max())
    if ref.nll is not None and new.nll is not None:
        ppl = [math.exp(sum(x) / max(1, len(x))) for x in (ref.nll, new.nll)]
        out["perplexity"], out["perplexity_ref"] = ppl[1], ppl[0]
        out["mean_abs_nll_diff"] = sum(abs(a - b) for a, b in zip(ref.nll, new.nll)) / max(1, len(ref.nll))
    return out


def folder_bytes(path: Path) -> int:
    """Bytes on disk of the model files of an export (everything but the card and the manifest)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def same_tokens(tok, ref_tok, p: Probes) -> float:
    """Share of the probes (rendered as the model reads them) that `tok` splits into exactly the ids
    `ref_tok` does: an export that carries its own tokenizer (GGUF) must read text the same way."""
    texts = p.texts or [ref_tok.apply_chat_template(c, tokenize=False) for c in p.conversations]
    same = [tok(t, add_special_tokens=False)["input_ids"] == ref_tok(t, add_special_tokens=False)["input_ids"]
            for t in texts]
    return sum(same) / max(1, len(same))
