"""Shared fixtures: tiny models built from a config (offline, seconds) and the real tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers have no terminal: rich would wrap its tables at 80 columns and cut the cells tests read
os.environ.setdefault("COLUMNS", "200")
# One pytest-xdist worker per core (`make test`): each worker, and the `tuneloop` processes its tests start,
# takes its share of the cores (tuneloop's default thread count follows OMP_NUM_THREADS), rather than every
# process starting one thread per core and the OpenMP pools of both workers fighting over the same two.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    # Inductor's pool of compile processes (one per core, each importing torch) costs more than it saves on
    # a share this small: the compiled-blocks test ran in 33 s with one compile thread, 44 s with the pool.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(_share))
    if "torch" in sys.modules:  # already imported by a plugin: it read the variable before it was set
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The files that keep one pytest-xdist worker busy for a minute or more (`--durations` of `make test`,
# 2026-12-03), heaviest first. `--dist loadfile` hands files out in collection order, so these start first and
# the small files fill in around them; collected alphabetically, the five resume tests (~150 s) came last
# and one worker ran them alone. A file missing from the list only loses its place; the order is data.
HEAVY_FIRST = ("test_train_resume.py", "test_train_sft.py", "test_ci.py", "test_loop.py",
               "test_integration_bundled.py", "test_train_distributed.py", "test_gate.py", "test_classify.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF folder (converted once from the installed package)."""
    from filelock import FileLock

    from tuneloop.zoo import cache_dir, resolve_model

    # pytest-xdist workers start together: one converts the bundled model, the others wait for it, so no
    # worker reads a folder another is swapping in.
    lock = cache_dir() / ".convert.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_dir) -> Path:
    """A 2-layer, 32-wide Llama with SmolLM2's real tokenizer and chat template, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
