"""Table rows → prompts through a Jinja template (tabular tasks such as demand forecasting).

`{{ column }}` inserts a cell; every Jinja filter works (`{{ temp | round(1) }}`). A column the template
names but the row lacks is an error naming the row, never an empty string (StrictUndefined)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jinja2

from ..errors import DataError


def load_template(spec: str) -> str:
    """`@path/to/file.j2` reads a file; anything else is the template text itself."""
    if spec.startswith("@"):
        p = Path(spec[1:])
        if not p.is_file():
            raise DataError(f"{p}: template file not found")
        return p.read_text(encoding="utf-8")
    return spec


def compile_template(spec: str) -> Callable[[dict[str, Any]], str]:
    source = load_template(spec)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
    try:
        tmpl = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"template:{e.lineno}: not a valid Jinja template ({e.message})") from None

    def render(row: dict[str, Any]) -> str:
        return tmpl.render(**{str(k): v for k, v in row.items()}).strip()

    return render
