"""Export a run for other runtimes: merged weights, the adapter for vLLM, GGUF for llama.cpp / Ollama,
int8 for CPU inference. The formats are a table (`FORMATS`, formats.py); each export is measured against
the unexported run and carries a model card."""

from .formats import FORMATS, Format, export_run, load_export, parse_format, read_manifest

__all__ = ["FORMATS", "Format", "export_run", "load_export", "parse_format", "read_manifest"]
