"""Answer-token log-probabilities without the full logits: the decoder's final hidden state caught by a
hook (`FinalHidden`), then the output matrix applied to the answer positions only, in chunks
(`answer_logps`). DPO / KTO training, their reference passes and the evaluation of their runs all read
log-probabilities this way; for SmolLM2 the full fp32 logits of a batch of 16 x 256 tokens would be 3.2 GB.
"""

from __future__ import annotations

import torch

from .encode import IGNORE


class FinalHidden:
    """Catches the decoder's last hidden state (after its final norm) through a forward hook, so the loss
    can be taken from it while the model itself is asked for no logits at all (`logits_to_keep` an empty
    index: asking for one position made matmul copy the 49k x 576 output matrix per row). A hook, rather than calling the inner decoder directly, keeps the call going
    through DDP's forward, which gradient synchronisation needs."""

    def __init__(self, model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if decoder is None or decoder is model:
            raise TypeError(f"{type(model).__name__} exposes no inner decoder (get_decoder)")
        self.value: torch.Tensor | None = None
        self.handle = decoder.register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        self.value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def take(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("the decoder's forward did not run")
        return v


NO_LOGITS = torch.zeros(0, dtype=torch.long)


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, `chunk` rows of logits at a time. Backward recomputes
    each chunk's logits (one more product) rather than keeping them: d logp / d logits = onehot - softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        w = weight.to(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = hidden[s:s + chunk] @ w.t()
            # fp32 log-softmax of the (possibly bf16) logits, as cross_entropy does for half inputs
            out[s:s + chunk] = torch.log_softmax(logits, -1, dtype=torch.float32).gather(
                1, targets[s:s + chunk, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            probs = torch.softmax(h @ w.t(), -1, dtype=torch.float32)
            rows = torch.arange(len(t), device=probs.device)
            # the target entry formed in fp32 (1 - p would cancel in bf16), then scaled per row
            g = -probs
            g[rows, t] += 1.0
            g = (g * grad_out[s:s + ctx.chunk, None].float()).to(hidden.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk] = g @ w
            if need_w:
                grad_w += (g.t() @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def answer_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's answer tokens (B,) fp32, answer token counts (B,)) from the
    final hidden states `hidden` (B, T, d) through the output matrix `weight` (V, d); `labels` (B, T) is
    IGNORE off the answers and is shifted by one here, as in the model's own loss."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    counts = keep.sum(-1)
    rows = hidden[:, :-1][keep]
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0 + torch.zeros(labels.shape[0], device=hidden.device), counts
    owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)[keep]
    per_token = _TokenLogProbs.apply(rows, weight, shifted[keep], chunk)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, owner, per_token)
    return sums, counts


def logits_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from full logits (B, T', V) whose last T positions are the text's (prompt tuning puts virtual
    tokens in front): for the PEFT methods that change the sequence inside their own forward."""
    logits = logits[:, -labels.shape[1]:]
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    sel = logits[:, :-1][keep].float().log_softmax(-1).gather(1, shifted[keep][:, None]).squeeze(1)
    owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)[keep]
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, owner, sel), keep.sum(-1)


def batch_logps(model, batch: dict, hidden: FinalHidden | None, out_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probs, answer token counts) per row of a collated batch (on the model's device):
    through `hidden` and `out_weight` when given (no logits at all), else through the model's logits.
    `use_cache=False`: with a cache object transformers would ignore packed position ids."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hidden is None:
        return logits_logps(model(**inputs, use_cache=False).logits, batch["labels"])
    model(**inputs, use_cache=False, logits_to_keep=NO_LOGITS.to(batch["input_ids"].device))
    return answer_logps(hidden.take(), out_weight, batch["labels"])
