"""Throughput of `tuneloop serve` against one-request-at-a-time `model.generate`.

The bundled SmolLM2-135M-Instruct, N concurrent clients (default 16) each asking for answers of exactly
T tokens (default 64; `min_tokens` keeps end-of-sequence away, `min_new_tokens` does the same for
generate). Prints tokens/s and p50/p95 latency for both, and the ratio. Target: ≥ 5× the throughput.

    python bench/serve_throughput.py [--clients 16] [--requests 64] [--tokens 64] [--dtype auto]

Latency of the baseline is given two ways: the time of one `generate` call (service time), and what
N clients arriving together would wait when served one at a time (queued), which is what a user sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()

TOPICS = ["apples", "rain", "trains", "bread", "the sea", "chess", "bees", "winter", "coffee", "maps", "clocks",
          "rivers", "tea", "bridges", "owls", "salt"]
PROMPTS = [f"Write a few sentences about {t}, number {i}." for i in range(4) for t in TOPICS]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def baseline(model_path: str, dtype, n: int, tokens: int, clients: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()

    def ids(p):
        return tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]

    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(ids(PROMPTS[0]), **kw)  # warm-up, not timed
        service, made = [], 0
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("generate, one at a time", total=n)
            t0 = time.perf_counter()
            for p in PROMPTS[:n]:
                x = ids(p)
                t = time.perf_counter()
                out = model.generate(x, **kw)
                service.append(time.perf_counter() - t)
                made += out.shape[1] - x.shape[1]
                prog.advance(task)
            wall = time.perf_counter() - t0
    del model
    # N clients arriving together, served one at a time: the k-th waits for the k-1 before it.
    queued = []
    for start in range(0, n, clients):
        acc = 0.0
        for s in service[start:start + clients]:
            acc += s
            queued.append(acc)
    return {"tokens": made, "seconds": wall, "tokens_per_s": made / wall, "p50_s": pct(service, .5),
            "p95_s": pct(service, .95), "queued_p50_s": pct(queued, .5), "queued_p95_s": pct(queued, .95)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def clients(url: str, model: str, n_clients: int, n_requests: int, tokens: int, prog, task) -> dict:
    from openai import AsyncOpenAI

    ac = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    todo = list(PROMPTS[:n_requests])
    lat, made = [], 0

    async def one_client():
        nonlocal made
        while todo:
            p = todo.pop(0)
            t = time.perf_counter()
            r = await ac.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                 max_tokens=tokens, temperature=0, extra_body={"min_tokens": tokens})
            lat.append(time.perf_counter() - t)
            made += r.usage.completion_tokens
            prog.advance(task)

    t0 = time.perf_counter()
    await asyncio.gather(*[one_client() for _ in range(n_clients)])
    wall = time.perf_counter() - t0
    await ac.close()
    return {"tokens": made, "seconds": wall, "tokens_per_s": made / wall, "p50_s": pct(lat, .5),
            "p95_s": pct(lat, .95)}


def served(model: str, n_clients: int, n_requests: int, tokens: int, dtype: str, threads: int | None) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ws = tempfile.mkdtemp(prefix="tuneloop-bench-")
    cmd = [sys.executable, "-m", "tuneloop.cli", "serve", "-m", model, "--port", str(port), "--max-batch",
           str(n_clients), "--max-new-tokens", str(tokens), "--dtype", dtype, "-w", ws]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("server did not come up in 300 s")
            time.sleep(0.5)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        with Progress(console=console, transient=True) as prog:
            warm = prog.add_task("warm-up", total=n_clients)
            asyncio.run(clients(url, name, n_clients, n_clients, 8, prog, warm))
            task = prog.add_task(f"tuneloop serve, {n_clients} clients", total=n_requests)
            res = asyncio.run(clients(url, name, n_clients, n_requests, tokens, prog, task))
        metrics = httpx.get(url + "/metrics").text
        vals = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                if line and not line.startswith("#")}
        res["mean_batch"] = vals.get("tuneloop_decode_rows", 0) / max(1.0, vals.get("tuneloop_decode_steps", 1))
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests sent to the server in all")
    ap.add_argument("--baseline-requests", type=int, default=16, help="requests run through generate")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers.utils import logging as hf_logging

    from tuneloop.infer.device import pick_dtype
    from tuneloop.zoo import resolve_model

    hf_logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = pick_dtype({"auto": "auto", "bfloat16": "bf16", "float32": "fp32"}[a.dtype], torch.device("cpu"))
    path = resolve_model(a.model)
    base = baseline(path, dtype, a.baseline_requests, a.tokens, a.clients)
    srv = served(a.model, a.clients, a.requests, a.tokens, a.dtype, a.threads)
    ratio = srv["tokens_per_s"] / base["tokens_per_s"]

    t = Table(title=f"{a.model} · {str(dtype).replace('torch.', '')} · {torch.get_num_threads()} threads · "
                    f"{a.tokens}-token answers")
    for c in ("system", "requests", "tokens/s", "p50 s", "p95 s"):
        t.add_column(c, justify="right")
    t.add_row("generate, one at a time (service)", str(a.baseline_requests), f"{base['tokens_per_s']:.1f}",
              f"{base['p50_s']:.2f}", f"{base['p95_s']:.2f}")
    t.add_row(f"generate, one at a time ({a.clients} queued)", "", "", f"{base['queued_p50_s']:.2f}",
              f"{base['queued_p95_s']:.2f}")
    t.add_row(f"tuneloop serve, {a.clients} clients (mean batch {srv['mean_batch']:.1f})", str(a.requests),
              f"{srv['tokens_per_s']:.1f}", f"{srv['p50_s']:.2f}", f"{srv['p95_s']:.2f}")
    console.print(t)
    verdict = "meets" if ratio >= 5 else "misses"
    console.print(f"throughput ratio: [bold]{ratio:.2f}×[/] ({verdict} the ≥ 5× target)")
    result = {"model": a.model, "dtype": str(dtype), "threads": torch.get_num_threads(), "clients": a.clients,
              "tokens": a.tokens, "baseline": base, "serve": srv, "ratio": ratio}
    if a.out:
        from tuneloop.fileio import write_json_atomic

        write_json_atomic(a.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
