"""Table rows → prompts through a Jinja template (tabular tasks such as demand forecasting). The one template
language of the data layer: `data check --template`, `data.template` of a recipe and every loader use it.

`{{ column }}` inserts a cell; every Jinja filter works (`{{ temp | round(1) }}`, `{{ "%.1f" | format(x) }}`).
A column the template names but the row lacks is an error naming the column and the template line, never
an empty string (StrictUndefined)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import jinja2
from jinja2 import meta, nodes

from ..errors import DataError

# `{name}` / `{name:.1f}` with no Jinja markup anywhere: a Python format string, which Jinja would copy
# into every prompt unchanged.
_FORMAT_FIELD = re.compile(r"(?<!\{)\{([A-Za-z_]\w*)(?:[:!][^{}]*)?\}(?!\})")


class MissingColumn(ValueError):
    """A row lacks a column the template names."""


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
        ast = env.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"template:{e.lineno}: not a valid Jinja template ({e.message})") from None
    m = _FORMAT_FIELD.search(source)
    if m and "{{" not in source and "{%" not in source:
        line = source.count("\n", 0, m.start()) + 1
        raise DataError(f"template:{line}: {m.group(0)} is a Python format field; templates are Jinja: write "
                        f"{{{{ {m.group(1)} }}}} (a format such as :.1f becomes {{{{ \"%.1f\" | format({m.group(1)}) }}}})")
    tmpl = env.from_string(ast)
    names = meta.find_undeclared_variables(ast) - set(env.globals)
    line_of: dict[str, int] = {}
    for n in ast.find_all(nodes.Name):
        if n.name in names:
            line_of[n.name] = min(line_of.get(n.name, n.lineno), n.lineno)
    needed = sorted(names, key=lambda n: (line_of.get(n, 1), n))

    def render(row: dict[str, Any]) -> str:
        try:
            return tmpl.render(**{str(k): v for k, v in row.items()}).strip()
        except Exception:
            # A filter on an undefined column fails with its own TypeError; name the column instead, and
            # where the template asks for it. (Checked only on failure, so `is defined` tests stay usable.)
            missing = [n for n in needed if n not in row]
            if not missing:
                raise
            raise MissingColumn(f"no column {missing[0]!r} (template line {line_of.get(missing[0], 1)})") from None

    return render
