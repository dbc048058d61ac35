"""Attention and bf16 helpers that inference and training share (measured by bench/train_throughput.py).

1. `cpu_attention`: attention as two bf16 matrix products and a softmax. On CPU, PyTorch's fused
   (flash) SDPA kernel runs bf16 at a fraction of the matmul peak: for SmolLM2 at 4x512 tokens it took a
   third of a LoRA step (torch.profiler), while the same attention written as `q @ k.T`, softmax, `@ v`
   goes through oneDNN's bf16 GEMM and is 2-3x faster forward and backward. The price is the T x T score
   matrix kept for backward, so it is used up to `MAX_MATMUL_TOKENS` and falls back to SDPA beyond.
2. `keep_adapter_inputs_bf16`: PEFT casts each LoRA input to the adapter's fp32 dtype; under bf16
   autocast the matmul casts it straight back. Turning the cast off removes two full-activation copies per
   adapted Linear, forward and backward, and changes no result (autocast computes in bf16 either way).

transformers has no CPU attention that uses the GEMM path for bf16; this one is checked against SDPA in
tests/test_fastpath.py.
"""

from __future__ import annotations

import torch

ATTENTION_NAME = "tuneloop_cpu"
# Above this many keys the T x T scores (kept for backward) cost more memory than the speed is worth.
MAX_MATMUL_TOKENS = 2048


def _allowed(attention_mask, is_causal: bool, tq: int, tk: int, device) -> torch.Tensor | None:
    """Boolean mask broadcastable to (B, 1, 1, Tq, Tk): True where a query may see a key; None = all."""
    if attention_mask is None:
        if is_causal and tq > 1:
            # aligned to the end: with a cache the Tq new queries are the last Tq of the Tk positions
            return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, :, None, :, -tk:]
    return attention_mask[:, :, None, :, -tk:] > torch.finfo(attention_mask.dtype).min / 2


class _MatmulAttention(torch.autograd.Function):
    """softmax(q k^T + mask) v with grouped heads, keeping only q, k, v for backward.

    The probabilities are recomputed in backward (as flash attention does) instead of being stored: they
    are the largest activation of a LoRA step (B x H x T x T, ~0.57 GB for 4 x 512 tokens on SmolLM2), and
    recomputing them costs one more bf16 product per layer.
    q: (B, Hkv, G*Tq, D), already scaled; k, v: (B, Hkv, Tk, D); allowed: see `_allowed`.
    """

    @staticmethod
    def _probs(q, k, allowed, g: int):
        b, hkv, gtq, _ = q.shape
        scores = torch.matmul(q, k.transpose(-1, -2))
        if allowed is not None:
            # a fully masked row (a pad) gets the dtype minimum everywhere: uniform, not NaN
            scores = scores.view(b, hkv, g, gtq // g, -1).masked_fill(~allowed, torch.finfo(scores.dtype).min)
        # The CPU softmax accumulates reduced-precision inputs in fp32 internally.
        return torch.softmax(scores, dim=-1).view(b, hkv, gtq, -1)

    @staticmethod
    def forward(ctx, q, k, v, allowed, g: int):
        out = torch.matmul(_MatmulAttention._probs(q, k, allowed, g), v)
        ctx.save_for_backward(q, k, v, allowed if allowed is not None else torch.empty(0))
        ctx.g, ctx.masked = g, allowed is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, allowed = ctx.saved_tensors
        probs = _MatmulAttention._probs(q, k, allowed if ctx.masked else None, ctx.g)
        grad_out = grad_out.to(q.dtype)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_p = torch.matmul(grad_out, v.transpose(-1, -2))
        # the softmax backward autograd itself would run (fp32 accumulation inside)
        grad_s = torch.ops.aten._softmax_backward_data(grad_p, probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_s, k)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None


def cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs):
    """transformers attention interface: query (B, H, Tq, D), key/value (B, Hkv, Tk, D) → (B, Tq, H, D).

    Grouped-query attention without copying keys: the H query heads are viewed as Hkv groups of H/Hkv
    heads stacked along the time axis, so one batched product serves each key/value head.
    """
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if (tk > MAX_MATMUL_TOKENS or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or (dropout and module.training)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    g = h // hkv
    scale = scaling if scaling is not None else d ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    allowed = _allowed(attention_mask, causal, tq, tk, query.device)
    # the scale goes on the queries (T x D) rather than the scores (T x T)
    q = (query * scale).reshape(b, hkv, g * tq, d)
    if torch.is_grad_enabled() and (q.requires_grad or key.requires_grad or value.requires_grad):
        out = _MatmulAttention.apply(q, key, value, allowed, g)
    else:
        out = torch.matmul(_MatmulAttention._probs(q, key, allowed, g), value)
    return out.view(b, h, tq, d).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make `attn_implementation="tuneloop_cpu"` known to transformers (its masks are SDPA's boolean masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def always_mask(*args, **kwargs):
        # SDPA's mask, but never None for an unpadded batch: `_allowed` would build the same causal mask
        # from None anyway, and under train.compile a None mask is a second graph of every block variant
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, cpu_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, always_mask)
    return ATTENTION_NAME


def attention_for(dev: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation to load a model with: the GEMM path for bf16 on CPU, SDPA elsewhere
    (on CUDA, SDPA dispatches to fused flash / memory-efficient kernels)."""
    if dev.type == "cpu" and dtype == torch.bfloat16:
        return register_attention()
    return "sdpa"


# attention implementations that take a custom 4-D mask, and in which form: boolean (True = may attend)
# or additive (0 / the dtype's minimum, added to the scores: eager adds whatever it is given)
MASK_FORMS = {"sdpa": "bool", ATTENTION_NAME: "bool", "eager": "additive"}


def as_attention_mask(allowed: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean (B, 1, Tq, Tk) mask as `implementation` takes it (see MASK_FORMS), or None where that
    implementation takes no custom mask."""
    form = MASK_FORMS.get(implementation or "")
    if form == "bool":
        return allowed
    if form == "additive":
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)
    return None


def keep_adapter_inputs_bf16(model) -> int:
    """Switch off PEFT's cast of each adapter input to fp32 (see the module doc); returns how many layers.

    Only valid under bf16 autocast, which the recipes use whenever the frozen weights are bf16."""
    n = 0
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


def bf16_matmuls(model, keep: tuple[str, ...] = ("score", "classifier", "lm_head")) -> int:
    """Inference layout for bf16 autocast on CPU: every Linear's weights in bf16 (autocast would cast them
    to bf16 for each product anyway: the same values, without the per-call cast), everything else (the
    embeddings, the norms, hence the residual stream between blocks) in fp32, and the layers named in
    `keep` (the head; `lm_head`, tied to the fp32 embeddings) left as they are. The block's elementwise work
    (norms, residual adds) then runs in fp32, which CPUs without native bf16 arithmetic do faster than
    bf16, and closer to an fp32 reference (bench/eval_throughput.py). The norms inside the blocks hand
    their output on in bf16, cast once where autocast would cast it again for each Linear that reads it (q,
    k, v, gate, up and their adapters): the same values, a fifth of the copies; the final norm's output stays
    fp32 for the head. Returns how many Linear layers."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not any(part in keep for part in name.split(".")):
            m.to(torch.bfloat16)
            n += 1
        elif type(m).__name__.endswith("RMSNorm") and ".layers." in f".{name}.":
            m.register_forward_hook(_bf16_output)
    return n


def _bf16_output(module, args, output):
    # only where the products run in bf16 (autocast on): outside it, a bf16 input would meet fp32 weights
    if torch.is_autocast_enabled(output.device.type) and output.dtype == torch.float32:
        return output.to(torch.bfloat16)
    return output
