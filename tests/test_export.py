"""`tuneloop export`: every format for every task it fits (a new format is a new row of `ROWS`), each
export loaded back and measured against the unexported run; the merged and GGUF folders read by plain
transformers in a fresh process; bad input as one line and an exit code; a failed export leaves nothing.

The models are tiny Llamas built from a config with a tiny byte-level BPE tokenizer (SmolLM2's
pre-tokenizer and chat template): GGUF readers parse every token in Python, and 49k of them take 40 s.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_helpers import run_cli_split as run_cli  # noqa: E402  (one way to call the real CLI)
from tuneloop.config import recipe_from_dict
from tuneloop.errors import ConfigError, NotFoundError
from tuneloop.export import FORMATS, Format, export_run, load_export, parse_format
from tuneloop.export.formats import MANIFEST
from tuneloop.runs import EXPORTS, RUN_INFO, open_run
from tuneloop.train import train_run

TRAIN = {"batch_size": 8, "lr": 1e-2, "precision": "fp32", "threads": 1, "max_length": 96, "max_steps": 4}
LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_dir) -> Path:
    """A 2-layer, 64-wide Llama (rows split into 32-wide quant blocks) with a 400-token byte-level BPE."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    words = ("the soup was great tasty lovely awful stale bland What is plus It is system user assistant "
             "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    t.train_from_iterator([words] * 50 + [str(i) for i in range(100)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = AutoTokenizer.from_pretrained(smol_dir).chat_template
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama-bpe")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _classify_data(tmp: Path) -> dict:
    rng = random.Random(0)

    def write(name: str, n: int) -> str:
        rows = []
        for i in range(n):
            good = i % 2
            word = rng.choice(["great", "tasty", "lovely"] if good else ["awful", "stale", "bland"])
            rows.append({"text": f"the soup was {word} {i}", "label": "good" if good else "bad"})
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp / name)

    return {"train": write("train.jsonl", 32), "test": write("test.jsonl", 12)}


def _sft_data(tmp: Path) -> dict:
    path = tmp / "chat.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "input": "",
                                        "output": f"It is {2 * i}."}) + "\n" for i in range(30)))
    return {"train": str(path), "test_ratio": 0.2, "val_ratio": 0.2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    """One finished run per task, trained for 4 steps."""
    tmp = tmp_path_factory.mktemp("export-runs")
    out = {}
    for task, data in (("classify", _classify_data(tmp)), ("sft", _sft_data(tmp))):
        recipe = recipe_from_dict({"name": f"exp-{task}", "task": task, "model": str(tiny_dir), "data": data,
                                   "method": LORA, "train": TRAIN})
        out[task] = train_run(recipe, tmp / "ws", show_progress=False)[0]
    return out


@dataclass
class Row:
    spec: str
    task: str
    # the export's argmax agreement with the unexported run on its test records must reach this
    agreement: float
    # generation: the largest mean |NLL change| per answer token; heads: the largest probability change
    tolerance: float
    files: tuple[str, ...]  # what the folder must hold besides README.md and export.json


ROWS = [
    Row("merged", "classify", 1.0, 1e-5, ("config.json", "model.safetensors", "tokenizer.json")),
    Row("merged:bf16", "classify", 1.0, 2e-2, ("config.json", "model.safetensors", "tokenizer.json")),
    Row("merged", "sft", 1.0, 1e-5, ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")),
    Row("merged:fp16", "sft", 1.0, 1e-2, ("config.json", "model.safetensors")),
    Row("adapter", "sft", 1.0, 0.0, ("adapter_config.json", "adapter_model.safetensors")),
    Row("gguf:f16", "sft", 1.0, 1e-2, ("model-f16.gguf", "Modelfile")),
    Row("gguf:bf16", "sft", 1.0, 2e-2, ("model-bf16.gguf", "Modelfile")),
    Row("gguf:q8_0", "sft", 0.95, 5e-2, ("model-q8_0.gguf", "Modelfile")),
    Row("gguf:q4_0", "sft", 0.8, 0.3, ("model-q4_0.gguf", "Modelfile")),
    Row("int8", "classify", 1.0, 5e-2, ("model/config.json", RUN_INFO, "labels.json", "recipe.yaml")),
    Row("int8:weight_only", "classify", 1.0, 5e-2, ("model/config.json", RUN_INFO)),
    Row("int8", "sft", 0.95, 5e-2, ("model/config.json", RUN_INFO, "test.jsonl")),
]


def test_every_format_and_task_has_a_row():
    assert {(r.spec.split(":")[0], r.task) for r in ROWS} == {
        (f.name, t) for f in FORMATS.values() for t in f.tasks if t in ("classify", "sft")}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.spec}-{r.task}")
@pytest.mark.slow
def test_round_trip(row: Row, runs, tmp_path):
    run_dir = runs[row.task]
    out = tmp_path / "export"
    m = export_run(str(run_dir), row.spec, out)
    assert m["path"] == str(out) and (out / MANIFEST).exists() and (out / "README.md").exists()
    for f in row.files:
        assert (out / f).exists(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert json.loads((out / MANIFEST).read_text())["spec"] == m["spec"] and m["bytes"] > 0

    # measured against the unexported run on the run's own test records, inputs read the same way
    d = m["delta"]
    assert d["n"] > 0 and d["same_tokens"] == 1.0 and d["agreement"] >= row.agreement, d
    if row.task == "sft":
        assert d["mean_abs_nll_diff"] <= row.tolerance, d
    else:
        assert d["max_abs_diff"] <= row.tolerance and d["quality"]["accuracy"] == pytest.approx(
            d["quality_unexported"]["accuracy"], abs=1 / d["n"] + 1e-9), d
    card = (out / "README.md").read_text()
    assert "argmax agreement" in card and open_run(run_dir).info.base_model in card and str(run_dir) in card

    # the folder loads back through its format's loader and gives the same outputs as the manifest said
    import torch

    model, tok, manifest = load_export(out)
    assert manifest == {k: v for k, v in m.items() if k != "path"}
    ids = tok("the soup was great", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits.float()).all()
    if row.spec.startswith("merged:") and row.task == "classify":
        assert m["facts"]["cast_cost"]["agreement"] == 1.0  # the cast from the fp32 merge, measured


def test_default_out_is_inside_the_run_and_reexport_replaces_it(runs):
    m = export_run(str(runs["sft"]), "gguf")
    out = Path(m["path"])
    assert out == runs["sft"] / EXPORTS / "gguf" and m["variant"] == "q8_0"
    (out / "stale.txt").write_text("from an earlier export")
    again = export_run(str(runs["sft"]), "gguf", verify=False)
    assert Path(again["path"]) == out and not (out / "stale.txt").exists() and "delta" not in again


FRESH = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
for folder, kind, gguf_file in json.loads(sys.argv[1]):
    cls = AutoModelForSequenceClassification if kind == "classify" else AutoModelForCausalLM
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(folder, **extra)
    model = cls.from_pretrained(folder, **extra).eval()
    if kind == "classify":
        ids = tok(["the soup was great 1", "the soup was awful 2"], return_tensors="pt", padding=True)
        out = model(**ids).logits.softmax(-1).tolist()
        labels = model.config.id2label
    else:
        text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model(**ids).logits[0, -1].argsort(descending=True)[:5].tolist()
        labels = None
    print(json.dumps({"out": out, "labels": labels, "tuneloop": "tuneloop" in sys.modules,
                      "peft": "peft" in sys.modules, "template": bool(tok.chat_template)}))
"""
FRESH_ROWS = [("merged", "classify", ""), ("merged", "sft", ""), ("gguf:f16", "sft", "model-f16.gguf")]


@pytest.mark.slow
def test_plain_transformers_loads_merged_and_gguf_in_a_fresh_process(runs, tmp_path):
    """No tuneloop, no PEFT: a new Python process with transformers alone reads the folders and gives the
    numbers the run itself gives through tuneloop's loader."""
    import torch

    from tuneloop.runs import load_for_inference

    jobs = []
    for i, (spec, task, gguf_file) in enumerate(FRESH_ROWS):
        out = tmp_path / f"export-{i}"
        export_run(str(runs[task]), spec, out, verify=False)
        jobs.append((str(out), task, gguf_file))
    res = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    results = [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]
    assert len(results) == len(FRESH_ROWS)
    for (spec, task, _), got in zip(FRESH_ROWS, results):
        assert not got["tuneloop"] and not got["peft"] and got["template"], spec
        loaded = load_for_inference(runs[task], torch.device("cpu"))
        tok = loaded.tokenizer
        with torch.no_grad():
            if task == "classify":
                assert got["labels"] == {"0": "bad", "1": "good"}
                ids = tok(["the soup was great 1", "the soup was awful 2"], return_tensors="pt", padding=True)
                want = loaded.model(**ids).logits.softmax(-1)
                assert torch.allclose(torch.tensor(got["out"]), want, atol=1e-4), spec
            else:
                text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                               add_generation_prompt=True, tokenize=False)
                ids = tok(text, return_tensors="pt", add_special_tokens=False)
                want = loaded.model(**ids).logits[0, -1].argsort(descending=True)[:5].tolist()
                assert got["out"][0] == want[0] and len(set(got["out"]) & set(want)) >= 4, spec


def test_gguf_metadata_and_modelfile(runs, tmp_path):
    import gguf

    out = tmp_path / "export"
    export_run(str(runs["sft"]), "gguf:q4_0", out, verify=False)
    r = gguf.GGUFReader(str(out / "model-q4_0.gguf"))
    field = {k: v.contents() for k, v in r.fields.items() if k not in ("tokenizer.ggml.merges",)}
    assert field["general.architecture"] == "llama" and field["llama.block_count"] == 2
    assert field["llama.attention.head_count"] == 4 and field["llama.attention.head_count_kv"] == 2
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "smollm"
    assert len(field["tokenizer.ggml.tokens"]) == 400 and field["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in field["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied: token_embd is output
    mf = (out / "Modelfile").read_text()
    assert mf.startswith("FROM ./model-q4_0.gguf") and 'PARAMETER stop "<|im_end|>"' in mf
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ else if" in mf and "SYSTEM" in mf
    # the template, filled in the way Ollama's Go template would be, gives the chat template's own text
    import re

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs["sft"] / "model")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    body = re.search(r'TEMPLATE """(.*?)"""', mf, re.S).group(1)
    filled = (body.replace("{{ if .System }}", "").replace("{{ .System }}", "Be brief.")
              .replace('{{ range .Messages }}{{ if eq .Role "user" }}', "").replace("{{ .Content }}", "Hi?"))
    filled = re.sub(r"\{\{ else if .*?\{\{ end \}\}\{\{ end \}\}", "", filled, flags=re.S).replace("{{ end }}", "")
    assert filled == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_int8_export_is_served_and_evaluated(runs, tmp_path):
    """The int8 folder is a run folder: `tuneloop eval` evaluates it and the server classifies with it."""
    from fastapi.testclient import TestClient

    from tuneloop.eval.tasks import evaluate_run
    from tuneloop.serve.app import ServeSettings, create_app
    from tuneloop.serve.launch import build_engine

    out = tmp_path / "int8"
    export_run(str(runs["classify"]), "int8", out, verify=False)
    report = evaluate_run(str(out), systems=["tuned"], show_progress=False)
    unexported = evaluate_run(str(runs["classify"]), systems=["tuned"], out_dir=tmp_path / "rep", show_progress=False)
    assert report["systems"]["tuned"]["accuracy"] == pytest.approx(unexported["systems"]["tuned"]["accuracy"], abs=0.1)
    engine = build_engine([f"cls={out}"], tmp_path, max_new_tokens=4)
    try:
        with TestClient(create_app(engine, ServeSettings(max_new_tokens=4), None)) as tc:
            r = tc.post("/v1/classify", json={"model": "cls", "input": ["the soup was great 1"]})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["label"] in {"good", "bad"}
    finally:
        engine.close()
    # a generation run's int8 folder is served as the base model, and evaluated like the run
    gen = tmp_path / "int8-sft"
    export_run(str(runs["sft"]), "int8", gen, verify=False)
    report = evaluate_run(str(gen), systems=["tuned"], show_progress=False)
    assert report["systems"]["tuned"]["perplexity"] > 1
    engine = build_engine([str(gen)], tmp_path, max_new_tokens=4)
    try:
        assert type(engine.model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
        with TestClient(create_app(engine, ServeSettings(max_new_tokens=4), None)) as tc:
            r = tc.post("/v1/chat/completions", json={"model": engine.base_name, "max_tokens": 4, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "What is 2 plus 2?"}]})
            assert r.status_code == 200, r.text
    finally:
        engine.close()


def test_adapter_config_names_the_base_and_vllm_rules(runs, tmp_path):
    from tuneloop.export.adapter import vllm_problems

    out = tmp_path / "adapter"
    m = export_run(str(runs["sft"]), "adapter", out, verify=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == open_run(runs["sft"]).info.base_model and not cfg.get("modules_to_save")
    assert m["facts"]["r"] == 4 and m["facts"]["vllm_max_lora_rank"] == 8 and "--max-lora-rank" not in m["facts"]["serve"]
    base = m["facts"]["base_path"]
    assert vllm_problems(out, base, None) == []
    # what vLLM refuses, we refuse: a saved head (modules_to_save), DoRA, a rank above 512
    cfg.update({"modules_to_save": ["score"], "use_dora": True, "r": 1024})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    problems = " | ".join(vllm_problems(out, base, None))
    assert "modules_to_save" in problems and "DoRA" in problems and "r 1024" in problems


# ----------------------------------------------------------------------------------------------------
# bad input: one line, an exit code, nothing written


def test_unknown_format_and_variant_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown format 'onnx' \(known: merged\[:fp32\|bf16\|fp16\], adapter"):
        parse_format("onnx")
    with pytest.raises(ConfigError, match=r"gguf has no variant 'q2_k' \(known: q8_0, q4_0, f16, bf16\)"):
        parse_format("gguf:q2_k")


@pytest.mark.parametrize("args,code,message", [
    (["--to", "onnx"], 2, "unknown format 'onnx'"),
    (["--to", "gguf"], 2, "gguf fits sft, dpo, kto runs; exp-classify"),
    (["--to", "adapter"], 2, "adapter fits sft, dpo, kto runs"),
])
def test_cli_errors_on_a_classify_run(args, code, message, runs, monkeypatch, capsys, tmp_path):
    out = tmp_path / "never"
    got, stdout, err = run_cli(monkeypatch, capsys, "export", str(runs["classify"]), *args, "-o", str(out))
    assert got == code and message in err and "Traceback" not in err + stdout
    assert "formats for it: merged, int8" in err or "unknown format" in err
    assert not out.exists()


def test_cli_refuses_an_unfinished_run_and_a_missing_one(runs, monkeypatch, capsys, tmp_path):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["sft"], unfinished, ignore=shutil.ignore_patterns(EXPORTS))
    info = json.loads((unfinished / RUN_INFO).read_text())
    (unfinished / RUN_INFO).write_text(json.dumps({**info, "status": "running"}))
    code, _, err = run_cli(monkeypatch, capsys, "export", str(unfinished), "--to", "merged")
    assert code == 2 and "training did not finish (status running)" in err
    assert not (unfinished / EXPORTS).exists()
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "nope"), "--to", "merged",
                           "-w", str(tmp_path / "ws"))
    assert code == 3 and "no such run folder" in err


def test_cli_refuses_to_overwrite_a_folder_that_is_not_an_export(runs, monkeypatch, capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs["sft"]), "--to", "merged", "-o", str(mine))
    assert code == 2 and "is not a tuneloop export" in err and (mine / "notes.txt").read_text() == "keep me"


def test_a_failed_export_leaves_nothing_that_looks_finished(runs, monkeypatch, tmp_path):
    """A new format is a new row; one that fails half-way leaves neither its folder nor a temporary one."""
    def write_half(run, out, variant, final):
        (out / "model.safetensors").write_bytes(b"half")
        raise ConfigError("disk full, say")

    row = Format("broken", ("sft",), ("x",), write_half, lambda folder, manifest: None, "a test row", "nothing")
    monkeypatch.setitem(FORMATS, "broken", row)
    out = tmp_path / "exports" / "broken"
    with pytest.raises(ConfigError, match="disk full"):
        export_run(str(runs["sft"]), "broken", out)
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []


def test_a_registered_version_exports_by_its_ref(runs, tmp_path):
    from tuneloop import registry

    ws = runs["sft"].parent.parent
    v = registry.register(ws, runs["sft"], name="faq")
    m = export_run(v.ref, "merged", tmp_path / "by-ref", workspace=ws, verify=False)
    assert m["ref"] == "faq:1" and m["run"] == str(runs["sft"])
    assert "`faq:1`" in (tmp_path / "by-ref" / "README.md").read_text()
    with pytest.raises(NotFoundError, match="faq:7"):
        export_run("faq:7", "merged", tmp_path / "nope", workspace=ws)
    assert not (tmp_path / "nope").exists()


def test_cli_prints_where_and_how_to_serve(runs, monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "export", str(runs["sft"]), "--to", "adapter", "-o",
                             str(tmp_path / "a"), "--no-verify")
    assert code == 0 and "adapter:peft" in out and "vllm serve" in out and "--enable-lora" in out


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_gguf(runs, tmp_path):
    """llama.cpp itself (llama-cpp-python, built from its sdist) loads the file, tokenizes like the run and
    predicts the same next token as the unexported run."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from tuneloop.runs import load_for_inference

    out = tmp_path / "export"
    export_run(str(runs["sft"]), "gguf:f16", out, verify=False)
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=256, logits_all=True, verbose=False)
    loaded = load_for_inference(runs["sft"], torch.device("cpu"))
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                                add_generation_prompt=True, tokenize=False)
    want = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    got = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert got == want
    llm.eval(got)
    import numpy as np

    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([want])).logits[0, -1].numpy()
    mine = np.array(llm.eval_logits[-1])
    assert int(mine.argmax()) == int(ref.argmax()) and np.abs(mine - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())
