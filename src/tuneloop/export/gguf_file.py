"""A merged causal LM as one GGUF file (llama.cpp, Ollama), written with the `gguf` package, and an
Ollama Modelfile beside it. Nothing is compiled or downloaded: the file is written from Python.

What goes in, learnt from llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`, `_set_vocab_gpt2`,
`get_vocab_base`) and checked against a GGUF that llama.cpp wrote (the bundled SmolLM2 file):
- tensor names from `gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)` (`blk.N.attn_q.weight` ...);
  q_proj / k_proj rows permuted (`LlamaModel.permute`): llama.cpp's rope pairs neighbouring rows, HF's
  pairs the two halves of each head;
- the hyperparameters `llama.*` (block count, lengths, heads, rope base and dimension, rms epsilon);
- the tokenizer: `tokenizer.ggml.model` gpt2 (byte-level BPE), every token with its type, the merges, the
  special ids, the chat template, and `tokenizer.ggml.pre` (which pre-tokenizer llama.cpp applies).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

# variant -> (GGML type of 2-D weights, llama.cpp's file type)
VARIANTS = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# HF architectures we write, and llama.cpp's name for each (a new architecture is a new row, once its
# tensor layout is checked by a round trip through transformers' GGUF loader)
ARCHS = {"LlamaForCausalLM": "llama"}
# llama.cpp names a pre-tokenizer by hashing what it does to a test text; we key by the tokenizer.json
# section that decides it. Each row is checked against a GGUF llama.cpp wrote for that tokenizer.
PRE_TOKENIZERS = {
    # SmolLM / SmolLM2 (ByteLevel, no prefix space, GPT-2 regex): the bundled SmolLM2 GGUF says "smollm"
    "baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "smollm",
}


def gguf_name(variant: str) -> str:
    return f"model-{variant}.gguf"


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half rows -> llama.cpp's interleaved pairs, per head (`LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer(tokenizer_json: dict) -> str:
    key = hashlib.sha256(json.dumps(tokenizer_json.get("pre_tokenizer"), sort_keys=True).encode()).hexdigest()
    if key not in PRE_TOKENIZERS:
        raise ConfigError(f"gguf: this tokenizer's pre-tokenizer ({json.dumps(tokenizer_json.get('pre_tokenizer'))[:120]}) "
                          f"is not one whose llama.cpp name we know (known: {', '.join(sorted(PRE_TOKENIZERS.values()))}); "
                          f"export `merged` and convert it with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[key]


def _vocab(tok, vocab_size: int, gguf) -> tuple[list[str], list[int]]:
    """Every id's token text and type, as `get_vocab_base` lists them (ids the tokenizer lacks are padding)."""
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensor(name: str, t: torch.Tensor, weight_type: str, gguf):
    """(array, GGML type) for one tensor: vectors stay F32; matrices take the variant's type when their
    rows split into its blocks, else F16 (llama.cpp falls back the same way)."""
    a = t.detach().float().numpy()
    if a.ndim == 1:
        return a.astype(np.float32), gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[weight_type]
    # The token embedding of a tied model is also its output layer, the most sensitive matrix: at 4 bits
    # it keeps 8 (as llama.cpp's own Q4 files do; the bundled Q4_1 SmolLM2 keeps token_embd in Q8_0).
    if weight_type == "Q4_0" and name == "token_embd.weight":
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        return a, qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16), qtype
    return gguf.quants.quantize(a, qtype), qtype


def write_gguf(model, tok, tokenizer_json: dict, path: Path, variant: str, name: str) -> dict:
    """Write `model` (a merged fp32 causal LM) and `tok` to `path` as GGUF `variant`; returns what was written."""
    import gguf

    cfg = model.config
    arch_name = (cfg.architectures or [type(model).__name__])[0]
    if arch_name not in ARCHS:
        raise ConfigError(f"gguf: a {arch_name} model; we write {', '.join(ARCHS)} (export `merged` and convert "
                          f"it with llama.cpp's convert_hf_to_gguf.py)")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"gguf: rope scaling {rope.get('rope_type')!r} is not written; export `merged`")
    arch = ARCHS[arch_name]
    weight_type, file_type = VARIANTS[variant]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tj = tokenizer_json
    if tj.get("model", {}).get("type") != "BPE" or (tj.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        raise ConfigError("gguf: we write byte-level BPE tokenizers (gpt2 style); export `merged`")
    pre = pre_tokenizer(tj)
    tokens, types = _vocab(tok, cfg.vocab_size, gguf)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType[file_type])
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                     ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    # what the HF tokenizer does: SmolLM's adds no BOS (llama.cpp's converter says the same for vocab 49152)
    w.add_add_bos_token(bool(tok("a")["input_ids"][:1] == [tok.bos_token_id] and tok.bos_token_id is not None))
    w.add_add_space_prefix(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    counts: dict[str, int] = {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads token_embd as the output layer when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ConfigError(f"gguf: no llama.cpp name for tensor {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            t = _permute(t, n_head)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute(t, n_kv)
        data, qtype = _tensor(g, t, weight_type, gguf)
        w.add_tensor(g, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": path.name, "tensor_types": counts, "pre_tokenizer": pre, "vocab_size": cfg.vocab_size}


def _split(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ConfigError(f"ollama: the chat template does not render the {what} once")
    a, b = text.split(sentinel)
    return a, b


def _go(s: str) -> str:
    """Literal text inside a Go template (Ollama): `{{` would open an action."""
    return s.replace("{{", '{{ "{{" }}')


def modelfile(tok, gguf_file: str) -> tuple[str, list[str]]:
    """An Ollama Modelfile for the GGUF: the chat template (Jinja, which Ollama does not run) rendered
    once per role and rewritten as the Go template Ollama reads, the default system prompt, and the stop
    tokens. Returns (text, notes on what could not be carried)."""
    S, U, A = "\u2063SYS\u2063", "\u2063USER\u2063", "\u2063ASSISTANT\u2063"
    notes: list[str] = []
    lines = [f"FROM ./{gguf_file}"]

    def render(msgs, gen=False) -> str:
        return tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)

    stops = [t for t in {tok.eos_token} if t]
    try:
        sys = [{"role": "system", "content": S}]
        r_s = render(sys)
        r_su = render(sys + [{"role": "user", "content": U}])
        r_sua = render(sys + [{"role": "user", "content": U}, {"role": "assistant", "content": A}])
        r_gen = render(sys + [{"role": "user", "content": U}], gen=True)
        if not (r_su.startswith(r_s) and r_sua.startswith(r_su) and r_gen.startswith(r_su)):
            raise ConfigError("ollama: the chat template's turns do not add up one after another")
        sp, ss = _split(r_s, S, "system turn")
        up, us = _split(r_su[len(r_s):], U, "user turn")
        ap, as_ = _split(r_sua[len(r_su):], A, "assistant turn")
        gen = r_gen[len(r_su):]
        r_u = render([{"role": "user", "content": U}])
        head = r_u[: r_u.index(up + U)] if (up + U) in r_u else ""
        default_system = head[len(sp):-len(ss)] if head and head.startswith(sp) and head.endswith(ss) else ""
        # no `{{-` trimming: the turns' own newlines are part of what the model was trained to read
        template = (
            f"{{{{ if .System }}}}{_go(sp)}{{{{ .System }}}}{_go(ss)}{{{{ end }}}}"
            f"{{{{ range .Messages }}}}"
            f"{{{{ if eq .Role \"user\" }}}}{_go(up)}{{{{ .Content }}}}{_go(us)}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{_go(ap)}{{{{ .Content }}}}{_go(as_)}"
            f"{{{{ end }}}}{{{{ end }}}}{_go(gen)}")
        lines.append(f'TEMPLATE """{template}"""')
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
        end = as_.strip()
        if end and end not in stops:
            stops.append(end)
    except (ConfigError, ValueError, TypeError) as e:
        notes.append(f"Modelfile has no TEMPLATE ({e}); Ollama then uses the GGUF's own chat template if it "
                     f"recognises it")
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n", notes
