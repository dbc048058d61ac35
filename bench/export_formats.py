"""Every export format of a run, measured in one table: size, load time, speed and quality against the
unexported run.

    python bench/export_formats.py RUN_DIR [RUN_DIR ...] [--limit 300] [--formats merged,int8,...] [--quick]

For each run folder (a classify run: the quickstart; a generation run: the FAQ assistant) every format
that fits its task is exported (`tuneloop.export.export_run`, verification off: the bench measures it
here, on more inputs) and then, one after the other in this process:

- `bytes`: the export's files on disk (unexported: the adapter plus the base's weights);
- `load_s`: seconds from the folder to a model ready to run (imports already warm);
- `speed`: records/s scoring the test inputs (classify, batches of 16), or tokens/s of greedy generation
  (sft: 4 test prompts, 32 new tokens each, one at a time). GGUF files are timed in llama.cpp itself
  (llama-cpp-python) when it is installed, since that is where they run; their quality is read through
  transformers' GGUF loader (which dequantizes to fp32), so it measures what quantization did to the weights;
- `quality`: on the run's own test set (its `data.test`, else the split it held out): accuracy
  (classify) or perplexity of the reference answers (generation), and `quality_unexported` beside it;
- `agreement`: share of test inputs (classify) or answer tokens (generation) whose argmax is the
  unexported model's.

The machine's bf16 matmul peak (`matmul_peak`, bench/train_throughput.py) is printed with the table. The
last line is `RESULT {"formats": {"TASK/FORMAT": {...}}}`; results also go to bench/results/export_formats.json.
`--quick` (8 inputs, one format per task) only proves the script runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import matmul_peak  # noqa: E402

FORMATS_FOR = {
    "classify": ["merged:fp32", "merged:bf16", "int8:dynamic", "int8:weight_only"],
    "sft": ["merged:bf16", "adapter", "gguf:f16", "gguf:q8_0", "gguf:q4_0", "int8:dynamic", "int8:weight_only"],
}
GEN_PROMPTS, GEN_TOKENS = 4, 32
REPACK = False  # --llama-repack


def classify_speed(model, tok, run, p, autocast: bool) -> float:
    from tuneloop.export.measure import score

    t = time.perf_counter()
    score(model, tok, run, p, autocast=autocast, batch_size=16)
    return len(p) / (time.perf_counter() - t)


def generation_speed(model, tok, p, autocast: bool) -> float:
    """Greedy tokens/s of transformers' generate, one prompt at a time, every prompt made to run GEN_TOKENS."""
    import torch

    n, t = 0, time.perf_counter()
    for conv in p.conversations[:GEN_PROMPTS]:
        ids = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.generate(**ids, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        n += out.shape[1] - ids["input_ids"].shape[1]
    return n / (time.perf_counter() - t)


def llama_cpp_speed(gguf_path: Path, tok, p) -> tuple[float, float] | None:
    """(load seconds, greedy tokens/s) of the GGUF in llama.cpp, or None when llama-cpp-python is missing."""
    try:
        import llama_cpp
    except ImportError:
        return None
    if not REPACK:
        # ggml repacks quantized weights for Intel AMX when the CPU reports it (its "extra buffer types"); on
        # the sandboxed machines here the CPU reports AMX but the first tile instruction traps (SIGILL in
        # libggml-cpu, `tilezero`: the q8_0 and q4_0 rows crashed). Off by default, so every machine of this
        # kind times the same AVX-512/AVX2 kernels; `--llama-repack` turns it back on.
        import llama_cpp.llama_cpp as low

        defaults = getattr(low.llama_model_default_params, "_before_no_repack", low.llama_model_default_params)

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        no_repack._before_no_repack = defaults  # (not __wrapped__: the ctypes binding already has one, a stub)
        llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    t = time.perf_counter()
    import torch

    # its default is half the cores; torch uses all of them
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=1024, verbose=False, n_threads=torch.get_num_threads())
    load = time.perf_counter() - t
    n, t = 0, time.perf_counter()
    for conv in p.conversations[:GEN_PROMPTS]:
        text = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        out = llm.create_completion(text, max_tokens=GEN_TOKENS, temperature=0.0, stop=[])
        n += out["usage"]["completion_tokens"]
    return load, n / (time.perf_counter() - t)


def unexported_bytes(run) -> int:
    from tuneloop.export.measure import folder_bytes

    base = Path(run.base_model_path())
    return folder_bytes(run.model_dir) + sum(f.stat().st_size for f in base.glob("*.safetensors"))


def measure_run(run_dir: str, formats: list[str] | None, limit: int, work: Path) -> dict[str, dict]:
    import torch

    from tuneloop.export import parse_format
    from tuneloop.export.measure import compare, probes, quality, score
    from tuneloop.export.merge import load_run
    from tuneloop.runs import open_run

    run = open_run(run_dir)
    task = run.task
    p = probes(run, limit=limit)
    metric = "accuracy" if task == "classify" else "perplexity"
    rows: dict[str, dict] = {}

    def row(name, nbytes, load_s, speed, scores, ref, note=""):
        q = quality(scores, p, run.info.labels)
        rows[f"{task}/{name}"] = {"bytes": nbytes, "load_s": round(load_s, 2), "speed": round(speed, 2),
                                  "speed_unit": "records/s" if task == "classify" else "tokens/s",
                                  "quality": q.get(metric), "quality_unexported": ref_quality.get(metric),
                                  "metric": metric, "agreement": compare(ref, scores)["agreement"] if ref else 1.0,
                                  "n": len(p), "note": note}
        print(f"  {name:18s} {nbytes / 2**20:8.1f} MiB  load {load_s:6.2f} s  {speed:8.2f} "
              f"{rows[f'{task}/{name}']['speed_unit']}  {metric} {q.get(metric)}  agreement "
              f"{rows[f'{task}/{name}']['agreement']:.4f}", flush=True)

    # ---- the unexported run, as tuneloop eval runs it
    dtype = getattr(torch, run.info.dtype or "float32")
    autocast = dtype == torch.bfloat16
    t = time.perf_counter()
    model, tok = load_run(run, dtype)
    load_s = time.perf_counter() - t
    ref = score(model, tok, run, p, autocast=autocast)
    ref_quality = quality(ref, p, run.info.labels)
    speed = classify_speed(model, tok, run, p, autocast) if task == "classify" else generation_speed(model, tok, p, autocast)
    print(f"{run.dir.name} ({task}, {run.info.method}, {run.info.dtype}; {len(p)} test inputs from {p.source})")
    row(f"unexported ({run.info.dtype})", unexported_bytes(run), load_s, speed, ref, None)
    del model

    for spec in formats or FORMATS_FOR.get(task, []):
        fmt, variant = parse_format(spec)
        if task not in fmt.tasks:
            continue
        try:
            measure_format(run, spec, fmt, p, ref, work, row)
        except Exception as e:  # one format failing must not lose the others' figures
            rows[f"{task}/{spec}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  {spec:18s} FAILED: {type(e).__name__}: {e}", flush=True)
    return rows


def measure_format(run, spec, fmt, p, ref, work: Path, row) -> None:
    from tuneloop.export import FORMATS, export_run
    from tuneloop.export.measure import score

    task = run.task
    out = work / f"{task}-{spec.replace(':', '-')}"
    t = time.perf_counter()
    m = export_run(str(run.dir), spec, out, verify=False)
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    model, etok = FORMATS[fmt.name].load(out, m)
    load_s = time.perf_counter() - t
    scores = score(model, etok, run, p)
    note = f"export {export_s:.0f} s"
    if task == "classify":
        speed = classify_speed(model, etok, run, p, False)
    elif fmt.name == "gguf":
        cpp = llama_cpp_speed(out / m["facts"]["file"], etok, p)
        if cpp is not None:
            load_s, speed = cpp
            note += "; load and speed in llama.cpp, quality via transformers' GGUF loader"
        else:
            speed = generation_speed(model, etok, p, False)
            note += "; speed in transformers (dequantized): llama-cpp-python is not installed"
    else:
        speed = generation_speed(model, etok, p, False)
    row(spec, m["bytes"], load_s, speed, scores, ref, note)
    del model
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (a classify run, a generation run)")
    ap.add_argument("--limit", type=int, default=300, help="test inputs per run (the first N of its test set)")
    ap.add_argument("--formats", help="comma-separated specs (default: every format that fits each run)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--llama-repack", action="store_true", help="let llama.cpp repack quantized weights for AMX "
                    "(traps on the sandboxed machines here; see llama_cpp_speed)")
    args = ap.parse_args()
    global REPACK
    REPACK = args.llama_repack
    import torch

    torch.manual_seed(0)
    peak = matmul_peak(1.0 if args.quick else 3.0)
    print(f"bf16 matmul peak {peak['bfloat16']:.3f} TFLOP/s, fp32 {peak['float32']:.3f} TFLOP/s "
          f"({torch.get_num_threads()} threads)", flush=True)
    formats = args.formats.split(",") if args.formats else None
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as work:
        for r in args.runs:
            from tuneloop.runs import open_run

            task = open_run(r).task
            fs = formats or (FORMATS_FOR.get(task, [])[:1] if args.quick else None)
            results.update(measure_run(r, fs, 8 if args.quick else args.limit, Path(work)))

    print(f"\n| run / format | MiB | load s | speed | quality (unexported) | agreement |   "
          f"(bf16 matmul peak {peak['bfloat16']:.3f} TFLOP/s)")
    print("|---|---|---|---|---|---|")
    for k, v in results.items():
        if "error" in v:
            print(f"| {k} | failed: {v['error']} | | | | |")
            continue
        print(f"| {k} | {v['bytes'] / 2**20:.1f} | {v['load_s']:.2f} | {v['speed']:.1f} {v['speed_unit']} | "
              f"{v['metric']} {v['quality']:.4f} ({v['quality_unexported']:.4f}) | {v['agreement']:.4f} |")
    out = {"formats": results, "matmul_peak_bf16_tflops": peak["bfloat16"], "matmul_peak_fp32_tflops": peak["float32"]}
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "export_formats.json").write_text(json.dumps(out, indent=2) + "\n")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
