"""The PEFT adapter alone, in the form vLLM's LoRA loader accepts, with the base named in it.

What vLLM checks when it loads a LoRA folder (read in vllm-project/vllm, late 2026):
- `vllm/lora/peft_helper.py` `PEFTHelper.from_dict`: `adapter_config.json` must have `r`, `lora_alpha`
  and `target_modules`; `_validate_features`: "vLLM only supports modules_to_save being None" and
  "vLLM does not yet support DoRA"; `validate_legal`: `r` at most the server's `--max-lora-rank`, and a
  bias other than "none" only with bias support on.
- `vllm/config/lora.py`: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]` (default 16), so a
  rank above 512 cannot be served at all and a rank above 16 needs `--max-lora-rank`.
- `vllm/lora/lora_model.py` `from_local_checkpoint`: reads `adapter_model.safetensors` (else .bin/.pt);
  every tensor's module (the name after `base_model.model.`, ending `lora_A.weight` / `lora_B.weight` or
  `lora_embedding_A/B`) must be one of the model's LoRA-capable modules (its linear layers, plus its
  embedding modules), else "expected target modules in ... but received ..."; `from_lora_tensors`: an
  embedding LoRA must match the base vocabulary's size (no resized embeddings).
Our checks below refuse, before writing anything, what those would refuse at serving time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..runs import ADAPTER_CONFIG, Run

VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_capable_modules(base_path: str) -> set[str]:
    """The last name of every linear layer and embedding of the base (what vLLM can put a LoRA on),
    found from the config on the meta device: nothing is loaded."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base_path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    return names


def vllm_problems(adapter_dir: Path, base_path: str, vocab_size: int | None) -> list[str]:
    """Why vLLM would refuse this PEFT folder (empty: it would load it)."""
    from safetensors import safe_open

    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}: vLLM serves LoRA adapters only")
        return problems
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            problems.append(f"adapter_config.json has no {key}")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: vLLM only supports modules_to_save being None "
                        f"(a trained head or embedding travels as full weights; export `merged` instead)")
    if cfg.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA; export `merged` instead")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}: vLLM serves LoRA biases only with bias support on; train with bias none")
    if int(cfg.get("r", 0)) > VLLM_MAX_RANKS[-1]:
        problems.append(f"r {cfg['r']}: above vLLM's largest --max-lora-rank ({VLLM_MAX_RANKS[-1]})")
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.exists():
        problems.append(f"no {ADAPTER_WEIGHTS}")
        return problems
    allowed = lora_capable_modules(base_path)
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            parts = name.replace("base_model.model.", "").split(".")
            if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
                module = parts[-3]
            elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
                module = parts[-2]
                if parts[-1] == "lora_embedding_A" and vocab_size and f.get_slice(name).get_shape()[1] != vocab_size:
                    problems.append(f"{name}: an embedding LoRA over a resized vocabulary "
                                    f"({f.get_slice(name).get_shape()[1]} != {vocab_size})")
            else:
                problems.append(f"{name}: not a LoRA weight (a full tensor saved beside the adapter, e.g. resized "
                                f"embeddings)")
                continue
            if module not in allowed:
                problems.append(f"{name}: module {module!r} is not one vLLM can put a LoRA on "
                                f"({', '.join(sorted(allowed))})")
    return problems


def base_name(run: Run) -> str:
    """The base as someone else's machine names it: a zoo model's hub id, else the recipe's model."""
    from ..zoo import ZOO

    spec = ZOO.get(run.info.base_model)
    return spec.hub_id if spec is not None else run.info.base_model


def write_adapter(run: Run, out: Path) -> dict:
    """Copy the run's adapter into `out`, its config naming the base by hub id; refuse what vLLM would."""
    if not run.is_adapter:
        raise ConfigError(f"{run.dir}: a {run.info.method} run holds full weights, not an adapter; export "
                          f"`merged` (or `gguf`, `int8`)")
    if run.info.merged_adapters:
        raise ConfigError(f"{run.dir}: its adapter was trained over the base with {run.info.parent_run or 'a parent run'}'s "
                          f"adapter merged in, so on the plain base it answers as neither model; export `merged`")
    from transformers import AutoConfig

    base_path = run.base_model_path()
    vocab = getattr(AutoConfig.from_pretrained(base_path), "vocab_size", None)
    problems = vllm_problems(run.model_dir, base_path, vocab)
    if problems:
        raise ConfigError(f"{run.dir}: vLLM would not load this adapter: " + "; ".join(problems))
    for f in run.model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    cfg["base_model_name_or_path"] = base_name(run)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    r = int(cfg["r"])
    max_rank = next(x for x in VLLM_MAX_RANKS if x >= r)
    return {"base_model": cfg["base_model_name_or_path"], "base_path": base_path, "r": r,
            "vllm_max_lora_rank": max_rank, "target_modules": cfg.get("target_modules"),
            "serve": f"vllm serve {cfg['base_model_name_or_path']} --enable-lora --lora-modules "
                     f"{run.info.name}={out.name}" + (f" --max-lora-rank {max_rank}" if max_rank > VLLM_DEFAULT_MAX_RANK else "")}
