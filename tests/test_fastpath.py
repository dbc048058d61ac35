"""The speed levers compute what the reference computes (fastpath.py): attention against SDPA, the
answer-token loss against cross_entropy, both alone and inside a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneloop.infer import attention
from tuneloop.train import fastpath


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, mask, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if causal and q.shape[2] > 1:
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@pytest.mark.parametrize("tq,tk", [(7, 7), (1, 9), (3, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_sdpa(tq, tk, masked):
    torch.manual_seed(0)
    b, h, hkv, d = 2, 6, 2, 8
    q, k, v = torch.randn(b, h, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    mask = None
    if masked:
        # left padding on row 0 (its first two keys), causal everywhere
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).repeat(b, 1, 1, 1)
        mask[0, :, :, :2] = False
    out, _ = attention.cpu_attention(_Module(), q, k, v, mask)
    ref = _reference(q, k, v, mask, causal=True)
    assert out.shape == (b, tq, h, d)
    # queries with no visible key (pads) are undefined in both; compare the rest
    live = torch.ones(b, tq, dtype=torch.bool) if mask is None else mask[:, 0].any(-1)
    assert torch.allclose(out[live], ref[live], atol=1e-5)


def test_attention_fully_masked_row_is_finite():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    out, _ = attention.cpu_attention(_Module(), q, k, v, mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_linear_cross_entropy_value_and_gradients(dtype, tol):
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 10))
    labels[:, :4] = -100
    labels[1, 7] = -100
    total, count = fastpath.linear_cross_entropy(hidden, weight, labels, chunk=4)
    total.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    logits = (hidden[:, :-1].float() @ weight.float().t())
    ref = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    assert abs(total.item() - ref.item()) <= tol * abs(ref.item())
    assert torch.allclose(gh.float(), hidden.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(gw.float(), weight.grad.float(), atol=tol * 5, rtol=tol)
    # positions without a label get no gradient
    assert gh[:, :3].abs().sum() == 0


def test_linear_cross_entropy_without_labels_is_zero():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    total, count = fastpath.linear_cross_entropy(hidden, torch.randn(5, 8), torch.full((1, 4), -100))
    assert count == 0 and total.item() == 0.0
    total.backward()


def _tiny(path, attn):
    from transformers import AutoModelForCausalLM

    if attn == attention.ATTENTION_NAME:
        attention.register_attention()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def test_model_with_cpu_attention_matches_sdpa(tiny_llama_dir):
    """Padded, packed and cached (generation) calls give the same numbers with either attention."""
    fast, ref = _tiny(tiny_llama_dir, attention.ATTENTION_NAME), _tiny(tiny_llama_dir, "sdpa")
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-4)
        pos = torch.tensor([list(range(5)) + list(range(7))] * 2)  # two packed examples per row
        a = fast(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert torch.allclose(a, b, atol=1e-4)
        ga = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        gb = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)


def test_answer_token_loss_equals_model_loss(tiny_llama_dir):
    """sft's summed loss from the hidden states equals the model's own summed loss, gradients included."""
    from tuneloop.train.sft import summed_loss

    model = _tiny(tiny_llama_dir, "sdpa").train()
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    hook = fastpath.FinalHidden(model)
    fast = summed_loss(model, batch, torch.device("cpu"), hook, model.get_output_embeddings().weight)
    fast.backward()
    g_fast = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    ref = summed_loss(model, batch, torch.device("cpu"), None, None)
    ref.backward()
    assert abs(fast.item() - ref.item()) < 1e-4 * abs(ref.item())
    assert torch.allclose(g_fast, model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-6, rtol=1e-4)


def test_frozen_prefix_cache_replays_exactly_and_refuses_dropout(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tuneloop.train.fastpath import FrozenPrefixCache, first_trained_block

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 0
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=[1]))
    assert first_trained_block(model) == 1
    cache = FrozenPrefixCache(model, 1)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (ids != 0).long()
    with cache.capture([3, 4], mask):
        model(input_ids=ids, attention_mask=mask)
    assert cache.has([3, 4]) and not cache.has([5])
    assert cache.states[4].shape[0] == 2  # kept without padding
    # the replay runs block 1 only: block 0 is not even in the model while it runs
    calls = []
    hook = cache.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    gap, floor = cache.verify(model, lambda extra: model(input_ids=ids, attention_mask=mask).logits, [3, 4], mask)
    assert gap < 1e-6 and floor == 0.0 and len(calls) == 1  # the whole forward only (exact: no shape probe)
    hook.remove()
    cache.close()

    model.base_model.model.model.layers[0].self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        FrozenPrefixCache(model, 1)


def test_frozen_prefix_cache_tells_bf16_shape_noise_from_a_wrong_replay(tiny_llama_dir):
    """Kept states computed in one batch shape replay in another: in bf16 that moves the logits about as much
    as running the rows whole in another shape does, and the cache must stay on; a replay fed the wrong
    states must still turn it off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tuneloop.infer.batching import pad_batch
    from tuneloop.train.fastpath import FrozenPrefixCache, agrees

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=2, dtype=torch.bfloat16)
    model.config.pad_token_id = 0
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=[1]))
    ids = torch.randint(5, 900, (3, 24))
    ids[1, 15:] = 0
    ids[2, 9:] = 0
    mask = (ids != 0).long()

    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]

    def logits(extra):
        i, m = pad_batch(rows, 0, extra=extra)
        return model(input_ids=i, attention_mask=m).logits

    cache = FrozenPrefixCache(model, 1)
    wide_ids, wide_mask = pad_batch(rows, 0, extra=40)  # first epoch: the rows sat in a longer batch
    with torch.no_grad(), cache.capture([0, 1, 2], wide_mask):
        model(input_ids=wide_ids, attention_mask=wide_mask)
    gap, floor = cache.verify(model, logits, [0, 1, 2], mask)
    assert agrees(gap, floor)
    said = []
    ctx = cache.around(model, [0, 1, 2], mask, logits, said.append)
    assert not said and cache.verified and not cache.off
    with ctx:
        pass

    wrong = FrozenPrefixCache(model, 1)
    with torch.no_grad(), wrong.capture([0, 1, 2], mask):
        model(input_ids=ids, attention_mask=mask)
    for r in wrong.states:
        wrong.states[r] = wrong.states[r] + 1.0
    said = []
    wrong.around(model, [0, 1, 2], mask, logits, said.append)
    assert wrong.off and said and "differs" in said[0]
    cache.close()


def test_replay_agreement_rule():
    from tuneloop.infer.batching import pad_batch
    from tuneloop.train.fastpath import agrees

    assert agrees(0.0005, 0.0) and not agrees(0.01, 0.0)
    assert agrees(0.25, 0.2) and not agrees(0.25, 0.05)
    ids, mask = pad_batch([[4, 5], [6]], 0, extra=3)
    assert ids.tolist() == [[4, 5, 0, 0, 0], [6, 0, 0, 0, 0]] and mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]


def _lora_model(path, bf16: bool):
    """The tiny model with LoRA adapters on every Linear (nonzero B, the same seed each time). bf16: the recipes'
    autocast layout (bf16 base weights, adapter inputs kept bf16); else the fp32 reference with the same
    weights (rounded to bf16 and back, so both hold the same numbers)."""
    from peft import LoraConfig, get_peft_model

    m = _tiny(path, "sdpa").train()
    attention.bf16_matmuls(m)
    if not bf16:
        for mod in m.modules():
            mod._forward_hooks.clear()  # bf16_matmuls' cast of the norms' outputs
            if isinstance(mod, torch.nn.Linear):
                mod.float()
    torch.manual_seed(1)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                     init_lora_weights=False))
    attention.keep_adapter_inputs_bf16(m)
    return m


def _run(model, ids, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids).logits.float()
    (logits.square().mean()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach(), grads


def test_fused_lora_linears_match_peft(tiny_llama_dir):
    """Against the fp32 computation, the fused LoRA product's logits and every adapter gradient are as close
    as PEFT's own bf16 path is (different rounding: the fused one sums in the GEMM's fp32 accumulator, PEFT
    rounds the LoRA branch to bf16 before adding it); a wrong scale or transpose would be off by ~100%."""
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (2, 12))
    l32, g32 = _run(_lora_model(tiny_llama_dir, bf16=False), ids, bf16=False)
    peft = _lora_model(tiny_llama_dir, bf16=True)
    l_peft, g_peft = _run(peft, ids, bf16=True)
    fused = _lora_model(tiny_llama_dir, bf16=True)
    assert fastpath.fuse_lora_linears(fused) == 2 * 7  # q k v o gate up down in each of the 2 blocks
    l_fused, g_fused = _run(fused, ids, bf16=True)

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert err(l_fused, l32) <= 2 * err(l_peft, l32) + 1e-3
    assert g_fused.keys() == g32.keys() and len(g32) == 2 * 2 * 7
    for name, g in g32.items():
        assert err(g_fused[name], g) <= 2 * err(g_peft[name], g) + 0.01, name
    # adapters switched off go to PEFT's own path: exactly the other model's numbers
    with torch.no_grad(), fused.disable_adapter(), peft.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused(input_ids=ids).logits, peft(input_ids=ids).logits)


def test_fused_lora_linears_leave_dropout_and_fp32_layers_alone(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(_tiny(tiny_llama_dir, "sdpa"), LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    assert fastpath.fuse_lora_linears(m) == 0  # fp32 base weights: PEFT's path is already one dtype
    m = _tiny(tiny_llama_dir, "sdpa")
    attention.bf16_matmuls(m)
    m = get_peft_model(m, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    assert fastpath.fuse_lora_linears(m) == 0  # dropout copies the input: not the fused product


def _bf16_lora(path, lean: bool):
    """The tiny model as the SFT recipe holds it: bf16 throughout, LoRA on every Linear (nonzero B, the same
    seed each time), adapter inputs kept bf16; `lean`: with fastpath.lean_saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    torch.manual_seed(1)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                     init_lora_weights=False))
    attention.keep_adapter_inputs_bf16(m)
    if lean:
        assert fastpath.lean_saves(m) == 2 * 3 + 1  # two norms and the MLP in each block, the final norm
    return m


def _saved_bytes_and_grads(model, ids):
    storages = {}

    def pack(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    (logits.square().mean()).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, sum(storages.values())


def test_lean_saves_keep_the_values_and_save_less(tiny_llama_dir):
    """Same forward values bit for bit, the same adapter gradients up to fp32 rounding in the norm's backward
    (a wrong RMSNorm or SiLU gradient is off by far more), and per block one MLP-width bf16 tensor and half of
    two fp32 hidden-width ones fewer bytes kept for backward."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    b, t = 2, 12
    ids = torch.randint(10, 1000, (b, t))
    l_ref, g_ref, saved_ref = _saved_bytes_and_grads(_bf16_lora(tiny_llama_dir, lean=False), ids)
    l_lean, g_lean, saved_lean = _saved_bytes_and_grads(_bf16_lora(tiny_llama_dir, lean=True), ids)
    assert torch.equal(l_lean, l_ref)
    assert g_lean.keys() == g_ref.keys() and len(g_ref) == 2 * 2 * 7
    for name, g in g_ref.items():
        assert ((g_lean[name] - g).norm() / g.norm()).item() < 0.02, name
    per_block = b * t * (2 * cfg.intermediate_size + 2 * cfg.hidden_size * (4 - 2) - 2 * 4)  # minus the row scales
    assert saved_ref - saved_lean >= cfg.num_hidden_layers * per_block


def test_lean_saves_step_aside_without_gradients_and_for_other_norms(tiny_llama_dir):
    m = _bf16_lora(tiny_llama_dir, lean=True)
    ids = torch.randint(10, 1000, (1, 6))
    ref = _bf16_lora(tiny_llama_dir, lean=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)

    class GemmaRMSNorm(torch.nn.Module):  # scales by (1 + w): a different forward, left alone
        variance_epsilon = 1e-6

    assert fastpath.lean_saves(torch.nn.Sequential(GemmaRMSNorm())) == 0
