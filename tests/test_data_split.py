"""Splits: deterministic, stratified, augmented records only in train, leakage reported."""

from __future__ import annotations

import json

from data_helpers import run_cli, write_jsonl

from tuneloop.data.records import Record
from tuneloop.data.split import split_records


def _data(n=200):
    return [Record(text=f"review {i} about {'tea' if i % 3 else 'coffee'} number {i * 7}", label="a" if i % 4 else "b",
                   source=f"d.jsonl:{i + 1}") for i in range(n)]


def test_deterministic_and_stratified():
    rs = _data()
    a, b, c = split_records(rs, 0.1, 0.1, seed=3), split_records(rs, 0.1, 0.1, seed=3), split_records(rs, 0.1, 0.1, seed=4)
    assert [r.source for r in a.test] == [r.source for r in b.test]
    assert [r.source for r in a.test] != [r.source for r in c.test]
    assert (len(a.train), len(a.val), len(a.test)) == (160, 20, 20)
    assert a.summary()["labels"]["test"] == {"a": 15, "b": 5}  # the 3:1 ratio of the whole set
    assert not {r.source for r in a.train} & {r.source for r in a.test}


def test_augmented_never_in_val_or_test():
    rs = _data(50)
    aug = [Record(text=r.text + " (paraphrased)", label=r.label, source=f"d.jsonl:{100 + i}",
                  augmented_from=r.source) for i, r in enumerate(rs)]
    s = split_records(rs + aug, 0.2, 0.2, seed=0)
    assert all(r.augmented_from is None for r in s.val + s.test)
    held = {r.source for r in s.val + s.test}
    assert all(r.augmented_from not in held for r in s.train if r.augmented_from)
    assert len(s.dropped_augmented) == len(held)
    assert not s.leaks  # the paraphrases of held-out records were left out, so nothing leaks


def test_leakage_check_reports_near_duplicates():
    rs = _data(100)
    rs.append(Record(text=rs[0].text + "!", label=rs[0].label, source="d.jsonl:999"))
    s = split_records(rs, 0.3, 0.0, seed=1, leak_threshold=0.8)
    pair = {rs[0].source, "d.jsonl:999"}
    in_test = pair & {r.source for r in s.test}
    if len(in_test) == 1:  # the two near-copies landed on different sides: the check must say so
        assert any(x["source"] in pair and x["train_source"] in pair for x in s.leaks)


def test_split_cli(tmp_path):
    rows = [{"text": f"text {i} {'x' * (i % 5)}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    rows.append(dict(rows[0]))  # an exact copy: wherever the two land apart, that is a leak
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out = run_cli("data", "split", p, "--test", "0.25", "--val", "0.25", "--seed", "7")
    assert code == 0, out
    d = tmp_path / "d-split"
    summary = json.loads((d / "split.json").read_text())
    assert summary["counts"] == {"train": 21, "val": 10, "test": 10}
    assert sum(1 for _ in open(d / "test.jsonl")) == 10
    code2, _ = run_cli("data", "split", p, "--test", "0.25", "--val", "0.25", "--seed", "7", "-o", tmp_path / "again")
    assert (tmp_path / "again" / "test.jsonl").read_text() == (d / "test.jsonl").read_text()
    code, out = run_cli("data", "split", p, "--test", "0.6", "--val", "0.5")
    assert code == 2 and "fractions must be" in out


def test_templated_regression_rows_are_not_leaks_unless_the_target_matches():
    rs = [Record(text=f"Day {i % 7}: temperature mild, no games.", value=float(i), source=f"t:{i + 2}") for i in range(60)]
    s = split_records(rs, 0.2, 0.0, seed=0)
    assert s.leaks == []  # same prompt shape, different ridership: not a leak
    rs.append(Record(text=rs[0].text, value=rs[0].value, source="t:999"))  # a true copy, target included
    s = split_records(rs, 0.2, 0.0, seed=0)
    sides = {r.source for r in s.test}
    if ("t:2" in sides) != ("t:999" in sides):
        assert any({x["source"], x["train_source"]} == {"t:2", "t:999"} for x in s.leaks)
