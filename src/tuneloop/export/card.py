"""The model card of an export (README.md): what it is, how to load it, where it came from, and what the
export changed, measured against the unexported run."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .formats import Format


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _how_to_load(m: dict) -> list[str]:
    f, facts = m["format"], m.get("facts") or {}
    if f == "merged":
        return ["```python", "from transformers import AutoTokenizer, " + facts["auto_class"],
                f"model = {facts['auto_class']}.from_pretrained(\"{m['path_hint']}\")",
                f"tok = AutoTokenizer.from_pretrained(\"{m['path_hint']}\")", "```"]
    if f == "adapter":
        return ["```sh", facts["serve"], "```", "",
                f"vLLM's default `--max-lora-rank` is 16; this adapter has r={facts['r']}."]
    if f == "gguf":
        return ["```sh", f"llama-cli -m {m['path_hint']}/{facts['file']} -cnv", facts["ollama"], "```", "",
                "or, in Python: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"" + facts["file"] + "\")`."]
    if f == "int8":
        return ["```sh", facts["serve"], facts["eval"], "```", "",
                "Plain transformers (with torchao installed) loads `model/` with `from_pretrained`."]
    return []


def model_card(m: dict, fmt: "Format") -> str:
    m = {**m, "path_hint": "."}
    lines = ["---", f"base_model: {m['base_model']}", "tags: [tuneloop, export, " + m["format"] + ", " + m["task"] + "]",
             "---", "", f"# {m['run_name']} — {m['spec']}", "",
             f"{fmt.description[0].upper() + fmt.description[1:]}. Pick it for {fmt.use}.", "",
             "## How to load it", ""] + _how_to_load(m)
    lines += ["", "## Lineage", "", "| | |", "|---|---|"]
    for key in ("run", "ref", "base_model", "base_weights_sha256", "method", "tuneloop_version", "created"):
        if m.get(key):
            lines.append(f"| {key} | `{m[key]}` |")
    for split, fp in (m.get("data") or {}).items():
        if fp:
            lines.append(f"| data.{split} | `{fp}` |")
    if m.get("labels"):
        lines.append(f"| labels | {', '.join(f'`{x}`' for x in m['labels'])} |")
    rm = m.get("run_metrics") or {}
    lines += ["", "## The run's metrics", ""]
    if rm.get("systems"):
        h = rm.get("headline") or {}
        lines.append(f"From the run's report (headline `{h.get('metric')}`), before export:")
        lines += ["", "| system | metrics |", "|---|---|"]
        for s, vals in rm["systems"].items():
            lines.append(f"| {s} | " + ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items()
                                                 if isinstance(v, (int, float)) and not isinstance(v, bool)) + " |")
    else:
        lines.append("No report.json (the run was not evaluated); training metrics: "
                     + (", ".join(f"{k} {_fmt(v)}" for k, v in rm.items()) or "none") + ".")
    lines += ["", "## What the export changed (measured)", "", f"Size on disk: {m['bytes'] / 2**20:.1f} MiB."]
    facts = m.get("facts") or {}
    d = m.get("delta")
    if d:
        what = "answer tokens" if m["task"] in ("sft", "dpo", "kto") else "inputs"
        lines.append(f"Loaded back in {m.get('load_seconds')} s and compared with the unexported run on {d['n']} "
                     f"{what} of `{d['probes']}`:")
        lines += ["", "| measure | value |", "|---|---|", f"| argmax agreement | {d['agreement']:.4f} |",
                  f"| inputs tokenized the same | {d.get('same_tokens', 1.0):.4f} |"]
        for k in ("max_abs_diff", "perplexity_ref", "perplexity", "mean_abs_nll_diff"):
            if k in d:
                lines.append(f"| {k.replace('_ref', ' (unexported)')} | {_fmt(d[k])} |")
        for k, v in (d.get("quality") or {}).items():
            lines.append(f"| {k} (exported / unexported) | {_fmt(v)} / {_fmt((d.get('quality_unexported') or {}).get(k))} |")
    else:
        lines.append("Not verified (exported with verification off).")
    if "cast_cost" in facts:
        c = facts["cast_cost"]
        lines.append("")
        lines.append(f"The cast from the fp32 merge to {facts['dtype']}: argmax agreement {c['agreement']:.4f}"
                     + (f", largest output change {_fmt(c['max_abs_diff'])}" if "max_abs_diff" in c else "")
                     + (f", perplexity {_fmt(c['perplexity_ref'])} → {_fmt(c['perplexity'])}" if "perplexity" in c else "")
                     + ".")
    if facts.get("tensor_types"):
        lines.append("")
        lines.append("Tensor types: " + ", ".join(f"{k} {v}" for k, v in facts["tensor_types"].items()) + ".")
    limits = list(facts.get("notes") or [])
    if d and d.get("n", 0) < 100:
        limits.append(f"Deltas measured on {d['n']} {('tokens' if m['task'] in ('sft', 'dpo', 'kto') else 'inputs')} "
                      f"only; `bench/export_formats.py` measures the whole test set with speed.")
    if m["format"] == "gguf":
        limits.append("Verified through transformers' GGUF loader (which dequantizes); llama.cpp computes in the "
                      "quantized types, so its numbers can differ slightly.")
    if limits:
        lines += ["", "## Limits", ""] + [f"- {x}" for x in limits]
    return "\n".join(lines) + "\n"
