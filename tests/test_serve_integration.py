"""The engine on the bundled SmolLM2-135M-Instruct: batched greedy answers equal `generate` one by one."""

from __future__ import annotations

import threading

import pytest
import torch


@pytest.mark.integration
def test_bundled_model_batched_matches_generate(smol_dir):
    from transformers import AutoModelForCausalLM

    from tuneloop.serve.engine import Engine, GenRequest, SamplingParams

    prompts = ["What is the capital of France?", "Give me a word that rhymes with cat.",
               "Write one sentence about the sea and the wind and the boats."]
    engine = Engine(str(smol_dir), dtype=torch.float32, max_batch=8, batch_window_ms=50)
    try:
        tok = engine.tok
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]
        for i, x in enumerate(ids):
            engine.submit(GenRequest(prompt_ids=list(x), params=SamplingParams(max_new_tokens=16, temperature=0),
                                     on_token=outs[i].append, on_finish=lambda r, i=i: done[i].set()),
                          engine.base_name)
        for d in done:
            assert d.wait(120)
        assert engine.stats["max_batch_seen"] > 1
        model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
        for x, got in zip(ids, outs):
            ref = model.generate(torch.tensor([x]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, len(x):].tolist()
            ref = [t for t in ref if t not in engine.stop_ids]
            assert tok.decode(got) == tok.decode(ref[: len(got)]) and len(got) == len(ref)
        assert "Paris" in tok.decode(outs[0])
    finally:
        engine.close()
