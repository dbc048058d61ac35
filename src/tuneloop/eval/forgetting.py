"""Forgetting: did tuning cost the model its general English? Base and tuned are scored on the same general
material, and the report gives the change and flags it past `eval.forgetting_threshold`:

- perplexity on everyday English dialogue: the `chatterbot-corpus` package's general topics (history,
  science, literature, food, sports ...; a small BSD-licensed data package installed with `--no-deps` by
  the Makefile, because no installed package ships general English prose, only documentation and domain
  sets), `PASSAGES` passages of about `PASSAGE_CHARS` characters;
- a small set of general questions (`eval/data/general_questions.jsonl`): each answered by comparing the
  log-probability per token of the right answer with that of `WRONG_ANSWERS` wrong ones (the likeliest wins).

A classifier or regressor is a head on the LM's backbone: its general English is measured through the
adapted backbone with the base model's own output layer (the LM head it was pretrained with), which says
whether the backbone still represents English the way the LM head reads it. With prompt or prefix tuning
the backbone's weights are untouched, so nothing can be forgotten there and the section says it does not
apply; so does a base model that is not a causal LM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import NotFoundError
from ..infer.batching import pad_batch, sorted_batches
from .stats import bootstrap_interval

QUESTIONS_FILE = Path(__file__).parent / "data" / "general_questions.jsonl"
TEXT_PACKAGE = "chatterbot_corpus"  # pip name chatterbot-corpus
TEXT_TOPICS = ("conversations", "emotion", "food", "gossip", "greetings", "health", "history", "humor",
               "literature", "money", "movies", "politics", "psychology", "science", "sports", "trivia")
# Sized for speed: about 1,300 tokens of text and 1,300 of questions per system (SmolLM2-135M on the shared
# 2-core machine: 50 s per system in bf16 with other jobs running, 1,418 text tokens; the first sizes tried, 24
# passages and four choices, took 108 s).
PASSAGES = 12
PASSAGE_CHARS = 400
MAX_TOKENS = 160  # per passage
WRONG_ANSWERS = 2  # per question, of the three in the file

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> logits (B, T, V)
# Rows of the vocabulary projection at a time: 256 x 49k fp32 logits of SmolLM2 are 50 MB.
HEAD_CHUNK = 256


def general_passages(n: int = PASSAGES, chars: int = PASSAGE_CHARS) -> list[str]:
    """`n` passages of general English dialogue, taken in turn from each topic (deterministic)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec(TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"forgetting: the general text package {TEXT_PACKAGE.replace('_', '-')} is not installed "
                            f"(make setup installs it; or pip install --no-deps chatterbot-corpus)")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    per_topic: list[list[str]] = []
    for topic in TEXT_TOPICS:
        f = root / f"{topic}.yml"
        if not f.is_file():
            continue
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        passages, cur = [], ""
        for conv in doc.get("conversations") or []:
            lines = [str(x).strip() for x in conv if str(x).strip()]
            cur = (cur + "\n" if cur else "") + "\n".join(lines)
            if len(cur) >= chars:
                passages.append(cur)
                cur = ""
        per_topic.append(passages)
    out: list[str] = []
    for k in range(max((len(p) for p in per_topic), default=0)):
        out += [p[k] for p in per_topic if k < len(p)]
    return out[:n]


def general_questions() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


class Reader:
    """A model read for its log-probabilities: `hidden(ids, mask)` gives the final hidden states (B, T, d)
    of the text's positions and `head` the output layer. Called, it gives the full logits (a `LogitsFn`);
    `span_logprobs` instead projects only the positions it scores, in chunks."""

    def __init__(self, hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], head):
        self.hidden, self.head = hidden, head

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids, mask))


def causal_logits(model) -> Reader:
    """A causal LM (PEFT-wrapped or not) read through its own forward, the final hidden state caught by a
    hook and no logits asked for (`logits_to_keep` an empty index, as infer/logprobs.py does)."""
    from ..infer.logprobs import NO_LOGITS

    decoder = model.get_decoder()
    caught: list[torch.Tensor] = []

    def catch(module, args, output):
        caught.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def hidden(ids, mask):
        handle = decoder.register_forward_hook(catch)
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=NO_LOGITS.to(ids.device))
        finally:
            handle.remove()
        # prompt tuning puts virtual tokens in front: the text's positions are the last ones
        return caught.pop()[:, -ids.shape[1]:]

    return Reader(hidden, model.get_output_embeddings())


def backbone_logits(head_model, lm_head) -> Reader:
    """A sequence-classification model's (adapted) backbone read through a causal LM's head."""
    inner = head_model.get_base_model() if hasattr(head_model, "get_base_model") else head_model
    backbone = getattr(inner, inner.base_model_prefix)
    return Reader(lambda ids, mask: backbone(input_ids=ids, attention_mask=mask).last_hidden_state, lm_head)


@torch.no_grad()
def span_logprobs(logits_fn: "LogitsFn | Reader", seqs: list[list[int]], starts: list[int], pad_id: int,
                  batch_size: int, dev, bf16: bool = False) -> list[tuple[float, int]]:
    """(sum of log p, tokens) of each sequence's tokens from `starts[i]` on, each given those before it.
    A `Reader` projects only those positions (neither the padding nor a question's prompt goes through
    the vocabulary), `HEAD_CHUNK` rows at a time, each row's log-softmax taken in fp32 as before; a plain
    `LogitsFn` is read whole."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for b in sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_batch([seqs[i] for i in b], pad_id)
        spans = [(max(1, starts[i]), len(seqs[i])) for i in b]
        if not isinstance(logits_fn, Reader):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = logits_fn(ids.to(dev), mask.to(dev))
            logp = logits[:, :-1].float().log_softmax(-1).cpu()
            tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for r, i in enumerate(b):
                s, n = spans[r]
                out[i] = (float(tok[r, s - 1:n - 1].sum()), n - s)
            continue
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            h = logits_fn.hidden(ids.to(dev), mask.to(dev))
            # position t predicts token t + 1: the scored tokens s .. n-1 are read at s-1 .. n-2
            rows = torch.cat([torch.arange(s - 1, n - 1) + r * ids.shape[1] for r, (s, n) in enumerate(spans)])
            targets = ids.reshape(-1)[rows + 1].to(dev)
            h = h.reshape(-1, h.shape[-1])[rows.to(dev)]
            lp = torch.empty(len(rows), dtype=torch.float32)
            for c in range(0, len(rows), HEAD_CHUNK):
                logits = logits_fn.head(h[c:c + HEAD_CHUNK]).float()
                picked = logits.gather(1, targets[c:c + HEAD_CHUNK, None]).squeeze(1)
                lp[c:c + HEAD_CHUNK] = (picked - torch.logsumexp(logits, -1)).cpu()
        at = 0
        for r, i in enumerate(b):
            s, n = spans[r]
            out[i] = (float(lp[at:at + n - s].sum()), n - s)
            at += n - s
    return out


def general_scores(logits_fn: LogitsFn, tok, dev, *, passages: list[str] | None = None,
                   questions: list[dict] | None = None, batch_size: int = 8, bf16: bool = False) -> dict:
    """Per-passage NLL and token counts on the general text, and per-question (correct, margin): the right
    answer's mean log-probability per token minus the best wrong one's."""
    passages = general_passages() if passages is None else passages
    questions = general_questions() if questions is None else questions
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = [tok(p)["input_ids"][:MAX_TOKENS] for p in passages]
    text = span_logprobs(logits_fn, enc, [1] * len(enc), pad, batch_size, dev, bf16)
    seqs, starts, owner = [], [], []
    for qi, q in enumerate(questions):
        prompt = tok(f"Question: {q['question']}\nAnswer:")["input_ids"]
        for a in [q["answer"], *q["wrong"][:WRONG_ANSWERS]]:
            seqs.append(prompt + tok(" " + a, add_special_tokens=False)["input_ids"])
            starts.append(len(prompt))
            owner.append(qi)
    scored = span_logprobs(logits_fn, seqs, starts, pad, batch_size, dev, bf16)
    correct, margin = [], []
    for qi in range(len(questions)):
        s = [lp / max(1, k) for (lp, k), o in zip(scored, owner) if o == qi]
        correct.append(float(s[0] > max(s[1:])))
        margin.append(s[0] - max(s[1:]))
    return {"nll": [-lp for lp, _ in text], "tokens": [k for _, k in text], "correct": correct, "margin": margin}


def compare_general(base: dict, tuned: dict, threshold: float, seed: int = 0) -> dict:
    """The report's `forgetting` section from two systems' `general_scores`."""
    nb, nt, k = (np.array(base["nll"]), np.array(tuned["nll"]), np.array(base["tokens"], dtype=float))
    ppl_b, ppl_t = math.exp(nb.sum() / k.sum()), math.exp(nt.sum() / k.sum())
    rel = ppl_t / ppl_b - 1.0
    rel_iv = bootstrap_interval((nb, nt, k), lambda b, t, n, axis=-1: np.exp((t.sum(axis) - b.sum(axis)) / n.sum(axis)) - 1,
                                seed=seed)
    cb, ct = np.array(base["correct"]), np.array(tuned["correct"])
    acc_delta = float(ct.mean() - cb.mean())
    acc_iv = bootstrap_interval((cb, ct), lambda b, t, axis=-1: t.mean(axis) - b.mean(axis), seed=seed)
    flags = []
    if rel > threshold:
        flags.append(f"general-text perplexity rose {rel:.1%} (threshold {threshold:.0%})")
    if -acc_delta > threshold:
        flags.append(f"general-question accuracy fell {-acc_delta:.1%} (threshold {threshold:.0%})")
    return {"applies": True, "threshold": threshold,
            "text": {"source": f"{TEXT_PACKAGE.replace('_', '-')} (English, general topics)", "passages": len(nb),
                     "tokens": int(k.sum()), "base_perplexity": ppl_b, "tuned_perplexity": ppl_t,
                     "relative_change": rel, "interval": rel_iv},
            "questions": {"source": QUESTIONS_FILE.name, "n": len(cb), "base_accuracy": float(cb.mean()),
                          "tuned_accuracy": float(ct.mean()), "delta": acc_delta, "interval": acc_iv,
                          "base_margin": float(np.mean(base["margin"])), "tuned_margin": float(np.mean(tuned["margin"]))},
            "flagged": bool(flags), "reasons": flags}


def not_applicable(why: str) -> dict:
    return {"applies": False, "reason": why, "flagged": False}


def _causal_base(model_path: str) -> bool:
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(model_path).architectures or []
    return any(a.endswith("ForCausalLM") for a in archs)


def forgetting_for_head(run, loaded, threshold: float, seed: int = 0) -> dict:
    """Forgetting of a classify / regress run (`loaded`: its model from `runs.load_for_inference`): the base
    causal LM against the adapted backbone read through that LM's own head."""
    from transformers import AutoModelForCausalLM

    from ..infer.attention import attention_for, bf16_matmuls

    method = run.recipe.method.name
    if method in ("prompt_tuning", "prefix_tuning"):
        return not_applicable(f"method {method} learns virtual tokens only; the backbone's weights are unchanged")
    model_path = run.base_model_path()
    if not _causal_base(model_path):
        return not_applicable(f"{run.recipe.model} is not a causal LM: it has no LM head to read text with")
    dev, dtype = loaded.device, loaded.dtype
    bf16 = dtype == torch.bfloat16
    # the layout the tuned backbone is read with (infer/loaders.py), so base and tuned differ only by tuning
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if bf16 else dtype,
                                              attn_implementation=attention_for(dev, dtype))
    if bf16:
        bf16_matmuls(lm)
    lm = lm.to(dev).eval()
    loaded.model.eval()  # predict_z leaves it in train mode: adapter dropout would make scores random
    base = general_scores(causal_logits(lm), loaded.tokenizer, dev, bf16=bf16)
    tuned = general_scores(backbone_logits(loaded.model, lm.get_output_embeddings()), loaded.tokenizer, dev, bf16=bf16)
    del lm
    out = compare_general(base, tuned, threshold, seed)
    out["how"] = "the adapted backbone read through the base model's LM head"
    return out


def forgetting_html(report: dict) -> str:
    import html

    f = report.get("forgetting") or {}
    if not f:
        return ""
    e = html.escape
    if not f.get("applies"):
        return f"<h2>Forgetting</h2><p>Does not apply: {e(f.get('reason', ''))}</p>"
    t, q = f["text"], f["questions"]

    def iv(x, pct=False):
        if not x:
            return "-"
        return f"{x[0]:+.1%} … {x[1]:+.1%}" if pct else f"{x[0]:+.3f} … {x[1]:+.3f}"

    flag = ("<p><b>flagged:</b> " + e("; ".join(f["reasons"])) + "</p>") if f["flagged"] else \
        f"<p>not flagged (threshold {f['threshold']:.0%})</p>"
    return (f"<h2>Forgetting</h2>{flag}<table><tr><th>general ability</th><th>base</th><th>tuned</th>"
            f"<th>change</th><th>95% interval</th></tr>"
            f"<tr><th>perplexity, {e(t['source'])}: {t['passages']} passages, {t['tokens']} tokens</th>"
            f"<td>{t['base_perplexity']:.2f}</td><td>{t['tuned_perplexity']:.2f}</td>"
            f"<td>{t['relative_change']:+.1%}</td><td>{iv(t['interval'], True)}</td></tr>"
            f"<tr><th>accuracy, {q['n']} general questions (log-prob of the right answer vs wrong ones)</th>"
            f"<td>{q['base_accuracy']:.3f}</td><td>{q['tuned_accuracy']:.3f}</td><td>{q['delta']:+.3f}</td>"
            f"<td>{iv(q['interval'])}</td></tr></table>")
