"""`tuneloop export RUN_OR_VERSION --to FORMAT`: the export formats as plain data, and the one entry.

A format is a row of `FORMATS`: the tasks whose runs it fits, its variants (`gguf:q4_0`; the first is
the default), the function that writes it into a folder, and the function that loads it back for
measuring (plain transformers / PEFT, never tuneloop's own loaders). `export_run` resolves the run (a
folder, a name under `<workspace>/runs/`, or a registry ref NAME:VERSION / NAME@ALIAS), checks the format
fits, writes into a temporary sibling folder, measures the export against the unexported run on the
run's own test records, writes the model card and `export.json`, and renames the folder into place: a
failed export leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, NotFoundError
from ..fileio import atomic_dir, write_json_atomic, write_text_atomic
from ..runs import (CHECKPOINTS, EXPORTS, FAILED, GENERATIONS, MODEL, REPORT_HTML, REPORT_JSON, RUN_INFO, Run,
                    open_run, workspace_path)
from . import measure
from .merge import DTYPES, cast, dtype_name, load_run, merged_fp32

MANIFEST = "export.json"
CARD = "README.md"
MODELFILE = "Modelfile"
GENERATION = measure.GENERATION
HEAD_TASKS = ("classify",)


@dataclass(frozen=True)
class Format:
    name: str
    tasks: tuple[str, ...]
    variants: tuple[str, ...]
    write: Callable[["Run", Path, str, Path], dict]  # (run, temp folder, variant, final folder) -> facts
    load: Callable[[Path, dict], tuple]  # (export folder, its manifest) -> (model, tokenizer), on the CPU
    description: str
    use: str  # when to pick it (the card and `tuneloop export --help` say it)

    def default_variant(self, run: Run) -> str:
        if self.name == "merged":  # the dtype the run computed in
            return {"bfloat16": "bf16", "float16": "fp16"}.get(run.info.dtype or "", "fp32")
        return self.variants[0]


# ----------------------------------------------------------------------------------------------------
# merged: a plain Hugging Face folder


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task in GENERATION else AutoModelForSequenceClassification


def _save_hf(model, tok, folder: Path) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def write_merged(run: Run, out: Path, variant: str, final: Path) -> dict:
    model, tok = merged_fp32(run)
    fp32 = measure.score(model, tok, run, _probes(run)) if variant != "fp32" else None
    cast(model, DTYPES[variant])
    _save_hf(model, tok, out)
    facts = {"dtype": variant, "auto_class": _auto_class(run.task).__name__}
    if fp32 is not None:
        # what the one cast costs: the fp32 merge against the cast weights, on the same inputs
        facts["cast_cost"] = measure.compare(fp32, measure.score(model.float(), tok, run, _probes(run)))
    return facts


def load_merged(folder: Path, manifest: dict):
    from transformers import AutoTokenizer

    return _auto_class(manifest["task"]).from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------
# adapter: the PEFT folder for vLLM


def write_adapter(run: Run, out: Path, variant: str, final: Path) -> dict:
    from .adapter import write_adapter as write

    facts = write(run, out)
    facts["serve"] = facts["serve"].replace(f"={out.name}", f"={final}")
    return facts


def load_adapter(folder: Path, manifest: dict):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = manifest["facts"]["base_path"]  # this machine's copy of the base the config names
    tok_dir = folder if (folder / "tokenizer_config.json").exists() else base
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
    return model.eval(), AutoTokenizer.from_pretrained(str(tok_dir))


# ----------------------------------------------------------------------------------------------------
# gguf: one file for llama.cpp / Ollama


def write_gguf(run: Run, out: Path, variant: str, final: Path) -> dict:
    from .gguf_file import gguf_name, modelfile, write_gguf as write

    model, tok = merged_fp32(run)
    tj = json.loads((Path(run.tokenizer_path()) / "tokenizer.json").read_text()) \
        if (Path(run.tokenizer_path()) / "tokenizer.json").exists() else None
    if tj is None:
        raise ConfigError(f"gguf: {run.tokenizer_path()} has no tokenizer.json (a fast tokenizer) to write")
    facts = write(model, tok, tj, out / gguf_name(variant), variant, run.info.name)
    text, notes = modelfile(tok, gguf_name(variant))
    (out / MODELFILE).write_text(text)
    facts["notes"] = notes
    facts["ollama"] = f"cd {final} && ollama create {run.info.name} -f {MODELFILE}"
    return facts


def load_gguf(folder: Path, manifest: dict):
    """transformers' own GGUF loader (it dequantizes to fp32): the check that the file reads back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = manifest["facts"]["file"]
    return (AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=f).eval(),
            AutoTokenizer.from_pretrained(str(folder), gguf_file=f))


# ----------------------------------------------------------------------------------------------------
# int8: torchao weights for CPU inference, as a run folder tuneloop serves and evaluates


INT8_CONFIGS = {
    # int8 weights and activations quantized per token at run time: int8 matmuls
    "dynamic": "Int8DynamicActivationInt8WeightConfig",
    # int8 weights dequantized on the fly: smaller, activations stay in float
    "weight_only": "Int8WeightOnlyConfig",
}
# the run files an export folder does not carry: its model is new, its reports are not yet made
_NOT_CARRIED = {MODEL, CHECKPOINTS, EXPORTS, FAILED, REPORT_JSON, REPORT_HTML, GENERATIONS, RUN_INFO}


def write_int8(run: Run, out: Path, variant: str, final: Path) -> dict:
    import torchao.quantization as tq
    from transformers import TorchAoConfig

    model, tok = merged_fp32(run)
    # the base's dtype stays for what is not quantized (embeddings, norms); bf16 halves them
    dtype = DTYPES["bf16"] if run.info.dtype == "bfloat16" else torch.float32
    plain = out / ".merged"
    _save_hf(cast(model, dtype), tok, plain)
    del model
    quantized = _auto_class(run.task).from_pretrained(
        str(plain), dtype=dtype, quantization_config=TorchAoConfig(getattr(tq, INT8_CONFIGS[variant])()))
    quantized.save_pretrained(out / MODEL)
    tok.save_pretrained(out / MODEL)
    shutil.rmtree(plain)
    # the rest of the run folder, so that `tuneloop eval` and `tuneloop serve` read it as a run
    for f in run.dir.iterdir():
        if f.is_file() and f.name not in _NOT_CARRIED:
            shutil.copy2(f, out / f.name)
    info = run.info.model_copy(update={"merged_adapters": [], "dtype": str(dtype).replace("torch.", "")})
    write_json_atomic(out / RUN_INFO, info.model_dump(mode="json"))
    return {"config": INT8_CONFIGS[variant], "dtype": dtype_name(dtype), "run_folder": True,
            "serve": f"tuneloop serve --model {final}" if run.task in GENERATION else
                     f"tuneloop serve --model {final}  (classify: POST /v1/classify)",
            "eval": f"tuneloop eval {final}"}


def load_int8(folder: Path, manifest: dict):
    from transformers import AutoTokenizer

    return (_auto_class(manifest["task"]).from_pretrained(str(folder / MODEL)).eval(),
            AutoTokenizer.from_pretrained(str(folder / MODEL)))


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("merged", HEAD_TASKS + GENERATION, ("fp32", "bf16", "fp16"), write_merged, load_merged,
           "adapters merged into the base (in fp32, then cast): a plain Hugging Face folder with tokenizer "
           "and chat template (classify: with its head)",
           "anything that loads Hugging Face folders (transformers, TGI, vLLM without LoRA, further conversion)"),
    Format("adapter", GENERATION, ("peft",), write_adapter, load_adapter,
           "the PEFT LoRA folder alone, checked against vLLM's LoRA loader, its base named by hub id",
           "vLLM with --enable-lora: many adapters over one base"),
    Format("gguf", GENERATION, ("q8_0", "q4_0", "f16", "bf16"), write_gguf, load_gguf,
           "one GGUF file (llama.cpp, Ollama) with tokenizer and chat template, and an Ollama Modelfile",
           "llama.cpp / Ollama on laptops and CPUs; q4_0 is the smallest"),
    Format("int8", HEAD_TASKS + GENERATION, ("dynamic", "weight_only"), write_int8, load_int8,
           "torchao int8 weights (dynamic int8 activations, or weight-only), as a run folder "
           "`tuneloop serve` and `tuneloop eval` read",
           "CPU serving with tuneloop at a fraction of the memory"),
]}


# ----------------------------------------------------------------------------------------------------
# the one entry


def parse_format(spec: str) -> tuple[Format, str | None]:
    """`gguf:q4_0` -> (the gguf row, "q4_0"); an unknown name or variant fails listing the known ones."""
    name, _, variant = str(spec).strip().partition(":")
    if name not in FORMATS:
        known = ", ".join(f"{f.name}[:{'|'.join(f.variants)}]" for f in FORMATS.values())
        raise ConfigError(f"--to {spec}: unknown format {name!r} (known: {known})")
    fmt = FORMATS[name]
    if variant and variant not in fmt.variants:
        raise ConfigError(f"--to {spec}: {name} has no variant {variant!r} (known: {', '.join(fmt.variants)})")
    return fmt, variant or None


def resolve_run(target: str, workspace: Path | None = None) -> tuple[Run, str | None]:
    """(the finished run, its registry ref or None) for a folder, a run name, or NAME:VERSION / NAME@ALIAS."""
    from ..registry import is_ref

    p = Path(str(target)).expanduser()
    if not p.exists() and workspace is not None and not (Path(workspace) / "runs" / str(target)).is_dir() \
            and is_ref(str(target)):
        from ..registry import resolve

        v = resolve(workspace, str(target))
        return open_run(v.run_dir), v.ref
    return open_run(target, workspace), None


_PROBE_CACHE: dict[str, measure.Probes] = {}


def _probes(run: Run) -> measure.Probes:
    key = str(run.dir)
    if key not in _PROBE_CACHE:
        _PROBE_CACHE[key] = measure.probes(run, limit=16)
    return _PROBE_CACHE[key]


def _reference(run: Run) -> tuple[measure.Scores, object]:
    """The unexported run's scores, as `tuneloop eval` runs it (its dtype, its adapters on the base), and
    its tokenizer."""
    dtype = getattr(torch, run.info.dtype or "float32")
    model, tok = load_run(run, dtype)
    return measure.score(model, tok, run, _probes(run), autocast=dtype == torch.bfloat16), tok


def default_out(run: Run, fmt: Format, variant: str) -> Path:
    return run.dir / EXPORTS / (fmt.name if variant == fmt.variants[0] and fmt.name != "merged" else f"{fmt.name}-{variant}")


def export_run(target: str, to: str, out: Path | None = None, workspace: Path | None = None,
               verify: bool = True) -> dict:
    """Export a finished run (or registered version) as format `to`; returns the manifest (also in
    `<out>/export.json`). `verify`: load the export back and measure it against the run on its test
    records (the card's deltas)."""
    from .. import __version__
    from .card import model_card

    fmt, variant = parse_format(to)
    ws = workspace_path(workspace) if workspace is not None else None
    run, ref = resolve_run(target, ws)
    if run.task not in fmt.tasks:
        fits = [f.name for f in FORMATS.values() if run.task in f.tasks]
        raise ConfigError(f"--to {to}: {fmt.name} fits {', '.join(fmt.tasks)} runs; {run.dir.name} is a {run.task} "
                          f"run (formats for it: {', '.join(fits) or 'none'})")
    variant = variant or fmt.default_variant(run)
    out = Path(out).expanduser().resolve() if out is not None else default_out(run, fmt, variant)
    if out.exists() and not (out / MANIFEST).exists():
        raise ConfigError(f"-o {out}: exists and is not a tuneloop export; give a new folder")
    t0 = time.time()
    with atomic_dir(out) as tmp:
        facts = fmt.write(run, tmp, variant, out)
        manifest = {
            "format": fmt.name, "variant": variant, "spec": f"{fmt.name}:{variant}", "task": run.task,
            "run": str(run.dir), "ref": ref, "run_name": run.info.name, "base_model": run.info.base_model,
            "base_weights_sha256": run.info.base_weights_sha256, "method": run.info.method,
            "labels": run.info.labels, "data": run.info.data.model_dump(), "run_metrics": _headline(run),
            "tuneloop_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "facts": facts,
        }
        manifest["bytes"] = measure.folder_bytes(tmp)
        if verify:
            p = _probes(run)
            t = time.time()
            model, tok = fmt.load(tmp, manifest)
            manifest["load_seconds"] = round(time.time() - t, 2)
            (ref_scores, ref_tok), new_scores = _reference(run), measure.score(model, tok, run, p)
            manifest["delta"] = {**measure.compare(ref_scores, new_scores), "probes": p.source,
                                 "same_tokens": measure.same_tokens(tok, ref_tok, p),
                                 "quality": measure.quality(new_scores, p, run.info.labels),
                                 "quality_unexported": measure.quality(ref_scores, p, run.info.labels)}
            del model
        manifest["seconds"] = round(time.time() - t0, 1)
        write_text_atomic(tmp / CARD, model_card(manifest, fmt))
        write_json_atomic(tmp / MANIFEST, manifest)  # last: a folder with export.json is a finished export
    _PROBE_CACHE.pop(str(run.dir), None)
    manifest["path"] = str(out)
    return manifest


def _headline(run: Run) -> dict:
    """The run's evaluated metrics (report.json's systems), else its training metrics."""
    f = run.dir / REPORT_JSON
    if f.exists():
        try:
            rep = json.loads(f.read_text())
            return {"headline": rep.get("headline"), "systems": rep.get("systems")}
        except (OSError, ValueError):
            pass
    m = run.train_metrics
    return {k: m.get(k) for k in ("val_loss", "val_accuracy", "final_loss", "steps") if k in m}


def read_manifest(folder: Path) -> dict:
    f = Path(folder) / MANIFEST
    if not f.exists():
        raise NotFoundError(f"{folder}: not a finished tuneloop export (no {MANIFEST})")
    return json.loads(f.read_text())


def load_export(folder: Path) -> tuple:
    """(model, tokenizer, manifest) of an export folder, loaded by its format's own loader."""
    manifest = read_manifest(folder)
    model, tok = FORMATS[manifest["format"]].load(Path(folder), manifest)
    return model, tok, manifest
