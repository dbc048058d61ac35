"""Helpers for the data studio tests (kept out of conftest.py so parallel branches merge cleanly)."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch


def run_cli(*args: str) -> tuple[int, str]:
    """Run `tuneloop ARGS` in-process through the real entry point; (exit code, stdout+stderr)."""
    from tuneloop.cli import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out), patch.object(sys, "argv", ["tuneloop", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def faq_file(name: str) -> str:
    import zaragoza_construction_faq

    return str(Path(zaragoza_construction_faq.__file__).parent / "data" / name)


def run_cli_split(monkeypatch, capsys, *args):
    """`run_cli` with stdout and stderr apart, through pytest's own capture; returns (code, out, err)."""
    from tuneloop import cli

    monkeypatch.setattr(sys, "argv", ["tuneloop", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
