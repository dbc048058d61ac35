"""Predictions from the three kinds of system compared in every report.

- `tuned`: a trained classifier run (`infer.predict.predict_classifier`).
- `base`: the untuned instruct model, zero-shot: each label word is scored by its log-likelihood as the
  assistant's answer to a prompt; the likeliest label wins.
- `tfidf_logreg`: the classical baseline a data scientist would try first.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import Progress

from ..infer.batching import pad_batch, progress_columns, sorted_batches

console = Console(stderr=True)


def zero_shot_prompts(tok, texts: list[str], prompt: str, words: list[str], max_length: int,
                      system: str | None = None) -> list[list[int]]:
    """Token ids of the chat-formatted prompt up to where the assistant's answer starts."""
    choices = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    out = []
    for t in texts:
        # Truncate the text, not the instruction around it.
        t_ids = tok(t, add_special_tokens=False)["input_ids"][:max_length]
        t_short = tok.decode(t_ids)
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": prompt.format(text=t_short, choices=choices)})
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tok(msgs[-1]["content"] + "\nAnswer:")["input_ids"]
        out.append(list(ids))
    return out


@torch.no_grad()
def predict_zero_shot(model, tok, texts: list[str], labels: list[str], words: list[str], prompt: str,
                      batch_size: int, max_length: int, dtype: torch.dtype,
                      show_progress: bool = True, system: str | None = None) -> torch.Tensor:
    """Softmax over the labels' answer log-likelihoods, shape (len(texts), len(labels))."""
    dev = next(model.parameters()).device
    prompts = zero_shot_prompts(tok, texts, prompt, words, max_length, system)
    word_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    scores = torch.zeros(len(texts), len(labels))
    single = all(len(w) == 1 for w in word_ids)
    with Progress(*progress_columns(), console=console, disable=not show_progress) as progress:
        task = progress.add_task("eval base", total=len(texts), info="zero-shot")
        for idx in sorted_batches([len(p) for p in prompts], batch_size):
            if single:
                # One forward per prompt: the next-token distribution scores every one-token label.
                seqs = [prompts[i] for i in idx]
                ids, mask = pad_batch(seqs, tok.pad_token_id, left=True)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    h = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                position_ids=pos.to(dev)).last_hidden_state[:, -1]
                    logp = head(h).float().log_softmax(-1).cpu()
                scores[idx] = logp[:, [w[0] for w in word_ids]]
            else:
                # Multi-token labels: score prompt+label for each label; only the label positions
                # go through the vocabulary projection.
                for li, w in enumerate(word_ids):
                    seqs = [prompts[i] + w for i in idx]
                    ids, mask = pad_batch(seqs, tok.pad_token_id)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        h = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
                        for r, i in enumerate(idx):
                            start = len(prompts[i]) - 1
                            lp = head(h[r, start:start + len(w)]).float().log_softmax(-1).cpu()
                            scores[i, li] = lp[torch.arange(len(w)), torch.tensor(w)].sum()
            progress.update(task, advance=len(idx))
    return scores.softmax(-1)


def tfidf_logreg(train_texts: list[str], train_labels: list[str], seed: int = 0):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    return pipe.fit(train_texts, train_labels)
