"""Serving: an OpenAI-compatible HTTP API over one base model and many LoRA adapters."""
