"""The speed levers of the training recipes, each measured by bench/train_throughput.py.

1. `cpu_attention` and `keep_adapter_inputs_bf16`: the GEMM attention for bf16 on CPU and the switched-off
   fp32 cast of adapter inputs. Inference uses them too, so they live in infer/attention.py (its module doc
   says what each saves).
2. `linear_cross_entropy`: the LM loss computed only on the positions that carry a label, in chunks, with
   the gradient taken in the forward pass (as Liger's fused linear cross-entropy does on GPU). The full
   B x T x 49k fp32 logits never exist, and no log-softmax backward runs over them.
3. `compile_blocks` (regional torch.compile) and `FrozenPrefixCache` (frozen bottom blocks run once).
4. `fuse_lora_linears`: each plain LoRA Linear as one autograd function whose LoRA sum happens inside the
   GEMM (eager bf16 classification training; compiled blocks fuse it themselves).
5. `lean_saves`: RMSNorm and the SwiGLU product as autograd functions that keep fewer bytes for backward
   (eager bf16 SFT / DPO / KTO). On bench/train_throughput.py's 4 x 512 batches 270 MiB fewer saved
   tensors (1.49 GiB before); the same speed. Compiled blocks do not use them: Inductor picks its own saves,
   and with these inside it was 9% slower and no smaller (2-core AMD EPYC, bf16 peak 0.41 TFLOP/s).

Why not a library: Liger-Kernel's fused linear cross-entropy is Triton (GPU only), and transformers has no
CPU attention that uses the GEMM path for bf16; both are small, and each is checked against the reference
implementation in tests/test_fastpath.py.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from ..infer.encode import IGNORE
from ..infer.logprobs import FinalHidden  # noqa: F401  (moved to infer/, which evaluation shares)


# ----------------------------------------------------------------------------------------------------
# loss on answer tokens only


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, target); the gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        w = weight.to(hidden.dtype)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            t = targets[s:s + chunk]
            logits = h @ w.t()
            # fp32 probabilities straight from the bf16 logits (what cross_entropy does inside for half
            # inputs); the loss and the gradient both come from them, so no log-softmax backward runs.
            probs = torch.softmax(logits, -1, dtype=torch.float32)
            rows = torch.arange(len(t), device=probs.device)
            p_target = probs[rows, t]
            total += -torch.log(p_target.clamp_min(torch.finfo(torch.float32).tiny)).sum()
            if grad_h is None and grad_w is None:
                continue
            # d(CE)/d(logits) = softmax - onehot; the target entry is formed in fp32 before rounding, where
            # p - 1 would otherwise cancel catastrophically in bf16.
            g = probs.to(hidden.dtype)
            g[rows, t] = (p_target - 1.0).to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ w
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.has[0] else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 128) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of `hidden` (B, T, d) against `labels` (B, T) through the output
    matrix `weight` (V, d), on the positions whose shifted label is not IGNORE. Returns (sum, count).

    Same value as the model's own loss with `num_items_in_batch=1` (a sum), at a fraction of the memory:
    only `chunk` rows of logits exist at once."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    rows = hidden[:, :-1][keep]
    targets = shifted[keep]
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    return _LinearCrossEntropy.apply(rows, weight, targets, chunk), int(targets.numel())


# ----------------------------------------------------------------------------------------------------
# LoRA linears as one product each


class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T for a frozen W, with the LoRA sum accumulated inside the second GEMM.

    PEFT computes base(x), then lora_B(lora_A(x)), scales it and adds it: two extra passes over every
    output (and in backward a scaled copy of the output gradient and the sum of two input gradients). Here
    `addmm_` folds the scaled LoRA product into the base product's output, forward and backward alike. It
    saves x and x A^T, as PEFT's graph does; the LoRA branch's own output and its scaled copy never exist.
    On the quickstart's classify recipe (bench/classify_throughput.py, 2-core AMD EPYC, bf16 peak 0.33-0.36
    TFLOP/s, interleaved runs): 8% more tokens/s per unit of peak, peak RSS 2.7 GiB instead of 3.2. On SFT's
    4 x 512-token batches (bench/train_throughput.py --runs tuneloop_eager) it was 12% slower per unit of
    peak (memory 3.2-3.4 GiB instead of 3.6-3.9), so the SFT and preference recipes keep PEFT's path."""

    @staticmethod
    def forward(ctx, x, weight, a, b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        y = (x2 @ weight.t()).addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale, ctx.shape = scale, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, xa, weight, a, b = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gxa = (g2 @ b).mul_(ctx.scale)  # the gradient reaching x A^T (N x r: small)
        grad_x = (g2 @ weight).addmm_(gxa, a) if ctx.needs_input_grad[0] else None
        grad_a = gxa.t() @ x2 if ctx.needs_input_grad[2] else None
        grad_b = g2.t() @ (xa * ctx.scale) if ctx.needs_input_grad[3] else None
        return (None if grad_x is None else grad_x.view(ctx.shape)), None, grad_a, grad_b, None


def _fused_lora_forward(self, x, *args, **kwargs):
    """The fused product where it is exactly PEFT's computation (one plain LoRA adapter, active, unmerged,
    bf16 input under autocast with a frozen bf16 weight); everything else goes to PEFT's own forward."""
    names = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1 or x.dtype != torch.bfloat16
            or not torch.is_autocast_enabled(x.device.type)):
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    # the adapters' fp32 weights in bf16, as autocast would hand them to each product (a differentiable cast:
    # their gradients come back in fp32)
    with torch.autocast(x.device.type, enabled=False):
        return _FusedLoraLinear.apply(x, self.base_layer.weight, a.to(torch.bfloat16), b.to(torch.bfloat16),
                                      float(self.scaling[name]))


def fuse_lora_linears(model) -> int:
    """Route every plain LoRA Linear of `model` through `_FusedLoraLinear`; returns how many.

    A layer qualifies when its base is a bias-free, frozen bf16 nn.Linear and each adapter has no dropout
    and no variant (DoRA and the like keep PEFT's path); the check at each call sends anything else (fp32
    inputs, adapters switched off or merged, several active) to PEFT. Only for eager training under bf16
    autocast: torch.compile fuses the same passes by itself. Why by hand: PEFT has no fused LoRA kernel on
    CPU, and the GPU ones (Unsloth's, Liger's) are Triton."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # no PEFT: nothing to fuse
        return 0
    n = 0
    for m in model.modules():
        if type(m) is not LoraLinear or getattr(m, "fan_in_fan_out", False):
            continue
        base = m.base_layer
        if (type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad
                or base.weight.dtype != torch.bfloat16 or getattr(m, "lora_bias", {}).get(m.active_adapters[0])
                or not all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())):
            continue
        m.forward = _fused_lora_forward.__get__(m)
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# what autograd keeps for backward: the same gradients from fewer saved tensors


class _FrozenRMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, `w * bf16(x32 * rsqrt(mean(x32^2) + eps))`, for a frozen `w`, saving the bf16 input
    and the fp32 row scale instead of the fp32 copy of the input that autograd keeps (half the bytes: with
    two norms a block, the largest fp32 tensors of a LoRA step). The forward is the same operations; the
    backward is the RMSNorm gradient in fp32 from `bf16(g * w)`, which is where autograd's graph casts too."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r, weight)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, r, weight = ctx.saved_tensors
        gh = (g * weight).float()
        xh = x.float() * r
        grad = r * (gh - xh * (gh * xh).mean(-1, keepdim=True))
        return grad.to(x.dtype), None, None


def _frozen_rmsnorm_forward(self, hidden_states):
    if (self.weight.requires_grad or not hidden_states.requires_grad or not torch.is_grad_enabled()
            or hidden_states.dtype == torch.float32):
        return type(self).forward(self, hidden_states)
    return _FrozenRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


class _SiluMul(torch.autograd.Function):
    """`silu(gate) * up`, the SwiGLU product, keeping gate and up for backward and computing silu(gate)
    again there: autograd keeps silu(gate) as well, a third tensor of the MLP's width (the widest a block
    has). The gradients are the same operations as autograd's (`silu_backward`), so the same values."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        grad_up = g * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _silu_mul_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(_SiluMul.apply(gate, up))


# The classes whose forward is exactly the one each replacement restates (checked against the original in
# tests/test_fastpath.py); anything else keeps its own. Gemma's RMSNorm scales by (1 + w): not here.
LEAN_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
LEAN_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


def lean_saves(model) -> int:
    """Route `model`'s RMSNorms and SwiGLU MLPs through the leaner autograd functions above; returns how many.

    Only the saved tensors change, never the forward's values. Why by hand: PyTorch has no CPU fused RMSNorm
    or SwiGLU with a lean backward, and Liger-Kernel's are Triton (GPU only)."""
    n = 0
    for m in model.modules():
        name = type(m).__name__
        if name in LEAN_NORMS and hasattr(m, "variance_epsilon"):
            m.forward = _frozen_rmsnorm_forward.__get__(m)
            n += 1
        elif (name in LEAN_MLPS and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))
              and type(m.act_fn).__name__ in ("SiLU", "SiLUActivation")):
            m.forward = _silu_mul_forward.__get__(m)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# compilation


def find_blocks(model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, list) of the model's repeated transformer blocks: the first ModuleList of
    two or more modules of one type."""
    for parent in model.modules():
        for name, m in parent.named_children():
            if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1:
                return parent, name, m
    raise TypeError(f"{type(model).__name__}: no list of repeated blocks")


def compile_blocks(model, dynamic: bool = False) -> int:
    """torch.compile every transformer block of `model` in place; returns how many.

    Regional rather than whole-model compilation: the blocks share one code object, so Dynamo compiles one
    and reuses it for all (about 25 s on 2 cores instead of minutes). Inductor fuses the norms, rotary
    embedding, SiLU and casts, and its partitioner recomputes cheap elementwise results in backward
    instead of storing them, which is where the memory saving comes from.

    `dynamic`: one graph for every sequence length. SFT's packed rows all have one length, so the default
    specializes; classification batches are padded to their own longest review, and specialized graphs
    would recompile per length until Dynamo's cache limit (8) sends every block back to eager."""
    blocks = find_blocks(model)[2]
    for block in blocks:
        block.compile(dynamic=dynamic or None)
    return len(blocks)


# ----------------------------------------------------------------------------------------------------
# frozen-prefix cache


def first_trained_block(model) -> int:
    """Index of the lowest transformer block holding a trainable weight (the block count if none does)."""
    blocks = find_blocks(model)[2]
    for i, b in enumerate(blocks):
        if any(p.requires_grad for p in b.parameters()):
            return i
    return len(blocks)


EXACT = 1e-3  # a replay this close to the whole forward needs no further check
PAD_PROBE = 16  # extra padding columns for the whole forward that measures bf16's own shape noise


def agrees(gap: float, floor: float) -> bool:
    """A replay `gap` away from the whole forward is sound when it is exact, or no more than twice what
    the whole forward moves by itself between two batch shapes (`floor`), plus EXACT."""
    return gap <= 2 * floor + EXACT


class FrozenPrefixCache:
    """Epochs after the first skip the frozen bottom of the model.

    With adapters on the top blocks only (`method.top_layers`), the blocks below the first adapted one
    have no trainable weight, so for a given example their output never changes. The first epoch runs
    the whole model and keeps, per example, the hidden states entering block `first` (bf16: 4,000
    reviews of ~85 tokens are ~0.4 GB). Later epochs take the bottom blocks out of the model's block
    list and put the kept states in at block `first`; the embedding, masks and rotary tables are still
    made by the model's own forward, so the top blocks compute exactly what they would have. A step then
    costs the top blocks only: with 10 of 30 trained, a second epoch costs half of the first.

    `verify` checks once that a replayed forward reproduces the whole one; dropout in the bottom blocks
    (in training mode) makes a model ineligible up front.
    """

    def __init__(self, model, first: int):
        self.parent, self.attr, self.blocks = find_blocks(model)
        if not 0 < first < len(self.blocks):
            raise ValueError(f"no frozen blocks below the trained ones (first trained block {first})")
        bottom = list(self.blocks[:first])
        if any(p.requires_grad for b in bottom for p in b.parameters()):
            raise ValueError(f"blocks below block {first} have trainable weights")
        for b in bottom:
            for m in b.modules():
                if (isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "attention_dropout", 0) > 0:
                    raise ValueError("the frozen blocks apply dropout, so their output is not fixed")
        self.first = first
        self.verified = self.off = False
        self.states: dict[int, torch.Tensor] = {}
        self._mode: str | None = None
        self._rows: list[int] = []
        self._lengths: list[int] = []
        self.handle = self.blocks[first].register_forward_pre_hook(self._hook, with_kwargs=True)

    def has(self, rows: list[int]) -> bool:
        return all(r in self.states for r in rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def _hook(self, module, args, kwargs):
        if self._mode is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._mode == "capture":
            for r, n, h in zip(self._rows, self._lengths, hidden):
                self.states[r] = h[:n].detach().clone()
            return None
        first_state = self.states[self._rows[0]]
        kept = torch.zeros(hidden.shape, dtype=first_state.dtype, device=hidden.device)
        for i, (r, n) in enumerate(zip(self._rows, self._lengths)):
            kept[i, :n] = self.states[r]
        if args:
            return (kept, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kept}

    @contextmanager
    def _active(self, mode: str, rows: list[int], mask: torch.Tensor):
        self._mode, self._rows, self._lengths = mode, list(rows), mask.sum(-1).tolist()
        try:
            yield
        finally:
            self._mode = None

    def capture(self, rows: list[int], mask: torch.Tensor):
        """Run the model whole and keep the states entering block `first` for `rows` (right-padded batch)."""
        return self._active("capture", rows, mask)

    @contextmanager
    def replay(self, rows: list[int], mask: torch.Tensor):
        """Run only the blocks from `first` up, fed with the states kept for `rows`."""
        top = torch.nn.ModuleList(list(self.blocks)[self.first:])
        setattr(self.parent, self.attr, top)
        try:
            with self._active("replay", rows, mask):
                yield
        finally:
            setattr(self.parent, self.attr, self.blocks)

    def around(self, model, rows: list[int], mask: torch.Tensor, logits, say):
        """The context a training forward over `rows` runs in: capture the first time they are seen,
        replay afterwards. Before the first replay, `logits()` is run whole and replayed once; if the two
        differ by more than bf16 rounding explains (`agrees`), `say` tells why and the cache turns itself
        off (whole forwards from then on)."""
        if self.off:
            return nullcontext()
        if not self.has(rows):
            return self.capture(rows, mask)
        if not self.verified:
            gap, floor = self.verify(model, logits, rows, mask)
            if not agrees(gap, floor):
                say(f"frozen-layer cache off: a replayed forward differs from the whole one by {gap:.2g} "
                    f"(the same rows run whole in another batch shape differ by {floor:.2g})")
                self.close()
                self.off = True
                return nullcontext()
            self.verified = True
        return self.replay(rows, mask)

    @torch.no_grad()
    def verify(self, model, forward, rows: list[int], mask: torch.Tensor) -> tuple[float, float]:
        """(largest difference between `forward()`'s logits run whole and replayed, the same measured
        between two whole runs of these rows in different batch shapes), in eval mode (so adapter dropout
        does not count).

        Why the second figure: the kept states were computed in the first epoch's batch, padded to its
        longest row; a bf16 matmul of another shape rounds differently, and through the top blocks that
        moves logits by ~0.1 on its own (variable-length tweets: 0.25). Replay is sound when it differs
        from the whole forward no more than the whole forward differs from itself across shapes. The
        `forward(extra)` runs the batch right-padded by `extra` more (masked) columns: the same function of
        the rows in another shape."""
        was_training = model.training
        model.eval()
        try:
            whole = forward(0).float()
            with self.replay(rows, mask):
                part = forward(0).float()
            gap = float((whole - part).abs().max())
            floor = 0.0
            if gap > EXACT:
                # only needed when the replay is not exact: one more whole forward, once per run
                floor = float((whole - forward(PAD_PROBE).float()).abs().max())
        finally:
            model.train(was_training)
        return gap, floor

    def close(self) -> None:
        self.handle.remove()
        self.states.clear()
