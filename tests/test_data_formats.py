"""Reading every format and shape into canonical records, and naming every bad record (one test each)."""

from __future__ import annotations

import json

import pytest
from data_helpers import run_cli, write_jsonl

from tuneloop.data.validate import load_classification, read_records
from tuneloop.errors import DataError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]

# One row per shape: (row as written, expected kind, a check on the canonical record)
SHAPES = [
    ("openai", {"messages": CHAT}, "chat", lambda r: r.messages[2]["content"] == "Hello."),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, "chat",
     lambda r: [m["role"] for m in r.messages] == ["user", "assistant"]),
    ("alpaca", {"instruction": "Add", "input": "2 and 3", "output": "5"}, "chat",
     lambda r: r.messages[0]["content"] == "Add\n\n2 and 3"),
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, "chat", lambda r: r.messages[1]["content"] == "4"),
    ("preference", {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}, "preference",
     lambda r: (r.prompt, r.chosen, r.rejected) == ("Say hi", "Hi!", "No.")),
    ("preference", {"chosen": "Good answer", "rejected": "Bad answer"}, "preference", lambda r: r.prompt is None),
    ("preference", {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},
     "preference", lambda r: (r.prompt, r.chosen, r.rejected) == ("Hi?", "Hello!", "Go away.")),
    ("preference", {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                    "chosen": [{"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "assistant", "content": "Go away."}]},
     "preference", lambda r: r.prompt == "Hi?" and r.meta == {"system": "Be kind."}),
    ("preference", {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "margin": 2}, "preference",
     lambda r: r.margin == 2.0 and r.to_json()["margin"] == 2.0 and "margin" not in r.meta),
    ("kto", {"prompt": "Say hi", "completion": "Hi!", "label": True}, "kto",
     lambda r: (r.prompt, r.completion, r.label) == ("Say hi", "Hi!", "desirable")
     and r.to_json() == {"prompt": "Say hi", "completion": "Hi!", "label": True}),
    ("kto", {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
             "completion": "Go away.", "label": "undesirable"}, "kto",
     lambda r: (r.prompt, r.label, r.meta, r.input_text()) == ("Hi?", "undesirable", {"system": "Be kind."}, "Hi?")),
    ("kto", {"prompt": "Q", "completion": "A", "label": 0}, "kto", lambda r: r.label == "undesirable"),
    ("classify", {"text": "tasty", "label": "great", "product": "B00"}, "classify",
     lambda r: r.label == "great" and r.meta == {"product": "B00"}),
    ("regress", {"text": "Monday", "value": 15.7}, "regress", lambda r: r.value == 15.7),
    ("text", {"text": "A document."}, "text", lambda r: r.text == "A document."),
]


@pytest.mark.parametrize("shape,row,kind,ok", SHAPES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SHAPES)])
def test_every_shape_becomes_a_canonical_record(tmp_path, shape, row, kind, ok):
    res = read_records(str(write_jsonl(tmp_path / "d.jsonl", [row, row])))
    assert res.shape == shape and not res.problems
    assert res.records[0].kind == kind and ok(res.records[0])
    assert res.records[1].source.endswith("d.jsonl:2")


def test_json_array_csv_tsv_parquet_and_mapping(tmp_path):
    import pandas as pd

    rows = [{"review": "good", "score": "great"}, {"review": "bad", "score": "other"}]
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    (tmp_path / "b.json").write_text(json.dumps({"_meta": {"v": 1}, "items": rows}, indent=1))
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    pd.DataFrame(rows).to_parquet(tmp_path / "e.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "f.data", index=False)  # unknown extension: sniffed
    for name, second_line in [("a.json", 3), ("b.json", None), ("c.csv", 3), ("d.tsv", 3), ("e.parquet", 2),
                              ("f.data", 3)]:
        res = read_records(str(tmp_path / name), mapping={"text": "review", "label": "score"})
        assert [(r.text, r.label) for r in res.records] == [("good", "great"), ("bad", "other")], name
        if second_line:
            assert res.records[1].source.endswith(f"{name}:{second_line}"), res.records[1].source


def test_template_renders_table_rows(tmp_path):
    (tmp_path / "t.csv").write_text("day,temp,riders\nMon,20.5,15.7\nTue,30,16.1\n")
    res = read_records(str(tmp_path / "t.csv"), template="{{ day }}: {{ temp }} F", mapping={"value": "riders"})
    assert res.shape == "regress"
    assert [(r.text, r.value) for r in res.records] == [("Mon: 20.5 F", 15.7), ("Tue: 30 F", 16.1)]
    bad = read_records(str(tmp_path / "t.csv"), template="{{ nope }}", mapping={"value": "riders"})
    assert "t.csv:2: template:" in bad.problems[0] and "nope" in bad.problems[0]


def test_load_classification_still_works(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"t": "a", "y": "x"}, {"t": "b", "y": 1}, {"t": "c", "y": "x"}])
    loaded = load_classification(str(p), "t", "y")
    assert loaded.labels == ["1", "x"] and len(loaded.records) == 3 and len(loaded.fingerprint) == 64
    with pytest.raises(DataError, match=r"d.jsonl:2: y: unknown label '1'"):
        load_classification(str(p), "t", "y", labels=["x", "z"])
    with pytest.raises(DataError, match=r"d.jsonl:1: text: no such column"):
        load_classification(str(p), "text", "y")


# ----------------------------------------------------------------------------------------------------
# bad input: each case is a file, and the one line the user must see


def _lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


OK = {"text": "fine", "label": "a"}
BAD = [
    ("not-utf8", "d.jsonl", _lines(OK, b'{"text": "caf\xe9", "label": "a"}'), r"d.jsonl:2: encoding: not valid utf-8 "
     r"at byte offset \d+.*--encoding"),
    ("broken-json", "d.jsonl", _lines(OK, OK, b'{"text": "x", "label": '), r"d.jsonl:3: json: broken JSON"),
    ("not-an-object", "d.jsonl", _lines(OK, [1, 2]), r"d.jsonl:2: record: expected a JSON object, got an array"),
    ("missing-field", "d.jsonl", _lines(OK, {"text": "no label"}), r"d.jsonl:2: label: missing"),
    ("empty-field", "d.jsonl", _lines(OK, {"text": "  ", "label": "a"}), r"d.jsonl:2: text: empty"),
    ("label-is-list", "d.jsonl", _lines(OK, {"text": "x", "label": ["a"]}),
     r"d.jsonl:2: label: expected a string or integer label, got a list"),
    ("number-is-text", "d.jsonl", _lines({"text": "x", "value": 1.5}, {"text": "y", "value": "3"}),
     r"d.jsonl:2: value: expected a number, got text"),
    ("unknown-role", "d.jsonl", _lines({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
     r"d.jsonl:1: messages\[1\].role: unknown role 'bot' \(known: system, user, assistant\)"),
    ("not-alternating", "d.jsonl", _lines({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                                                        {"role": "assistant", "content": "a"}]}),
     r"d.jsonl:1: messages\[1\]: does not alternate: user after user"),
    ("no-assistant", "d.jsonl", _lines({"conversations": [{"from": "human", "value": "q"}]}),
     r"d.jsonl:1: conversations: no assistant turn"),
    ("mixed-formats", "d.jsonl", _lines({"instruction": "i", "output": "o"}, {"instruction": "j", "output": "p"},
                                        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
     r"d.jsonl:3: record: mixed formats: this record is sharegpt .* but the file is alpaca"),
    ("empty-file", "d.jsonl", b"\n  \n", r"d.jsonl:1: record: empty file"),
    ("ragged-csv", "d.csv", b"text,label\nok,a\nx,a,extra\n", r"d.csv:3: row: has 3 fields, the header has 2"),
    ("csv-repeated-header", "d.csv", b"text,text,label\nok,a,b\n", r"d.csv:1: header: column names repeat: text"),
    ("broken-json-array", "d.json", b'[\n{"text": "a", "label": "b"},\n{"text": }\n]', r"d.json:3: json: broken JSON"),
    ("kto-bad-label", "d.jsonl", _lines({"prompt": "q", "completion": "a", "label": True},
                                        {"prompt": "q", "completion": "b", "label": "maybe"}),
     r"d.jsonl:2: label: expected true/false, 1/0 or desirable/undesirable, got text \('maybe'\)"),
    ("kto-missing-label", "d.jsonl", _lines({"prompt": "q", "completion": "a", "label": "false"},
                                            {"prompt": "q", "completion": "b", "label": "true"},
                                            {"prompt": "q", "completion": "c"}),
     r"d.jsonl:3: label: missing"),
    ("margin-is-text", "d.jsonl", _lines({"chosen": "a", "rejected": "b", "margin": "big"}),
     r"d.jsonl:1: margin: expected a number, got text"),
    ("no-known-shape", "d.jsonl", _lines({"foo": 1}), r"d.jsonl:1: record: no known shape in keys \(foo\)"),
]


@pytest.mark.parametrize("name,fname,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_line_and_field(tmp_path, name, fname, content, message):
    import re

    p = tmp_path / fname
    p.write_bytes(content)
    code, out = run_cli("data", "check", p)
    assert code == 1, out
    assert re.search(message, out), out
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_50mb_line_is_refused_by_name(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps(OK) + "\n")
        f.write('{"text": "' + "x" * (50 * 1024 * 1024) + '", "label": "a"}\n')
    code, out = run_cli("data", "check", p)
    assert code == 1 and "big.jsonl:2: record: 52.4 MB on one line, over the 10 MB limit" in out, out[-500:]
    code, out = run_cli("data", "check", p, "--lenient")
    assert code == 0 and "skipped 1 unusable" in out


def test_encoding_option_bom_and_crlf(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\r\ncafé,a\r\nthé,b\r\n".encode("latin-1"))
    assert run_cli("data", "check", p)[0] == 1
    res = read_records(str(p), encoding="latin-1")
    assert [r.text for r in res.records] == ["café", "thé"]
    p2 = tmp_path / "bom.jsonl"
    p2.write_bytes(b"\xef\xbb\xbf" + _lines(OK, OK).replace(b"\n", b"\r\n"))
    res = read_records(str(p2))
    assert res.shape == "classify" and len(res.records) == 2 and "text" in json.dumps(res.records[0].to_json())
    p3 = tmp_path / "bom.csv"
    p3.write_bytes(b"\xef\xbb\xbftext,label\r\nx,a\r\n")
    assert read_records(str(p3)).records[0].text == "x"


def test_check_lenient_and_every_problem_listed(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [OK, {"text": ""}, OK, {"text": "x", "label": []}])
    code, out = run_cli("data", "check", p)
    assert code == 1 and "d.jsonl:2:" in out and "d.jsonl:4:" in out
    code, out = run_cli("data", "check", p, "--lenient")
    assert code == 0 and "skipped 2 unusable records" in out


def test_missing_file_and_unknown_options(tmp_path):
    code, out = run_cli("data", "check", tmp_path / "nope.jsonl")
    assert code == 1 and "nope.jsonl: file not found" in out
    code, out = run_cli("data", "check", write_jsonl(tmp_path / "d.jsonl", [OK]), "--shape", "weird")
    assert code == 1 and "unknown shape 'weird'" in out


def test_parquet_with_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": CHAT, "topic": "greeting"}, {"messages": CHAT[1:], "topic": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    res = read_records(str(tmp_path / "chat.parquet"))
    assert res.shape == "openai" and not res.problems
    assert res.records[0].messages == CHAT and res.records[0].meta == {"topic": "greeting"}


def test_kto_and_margin_keys_tell_records_apart_and_round_trip(tmp_path):
    from tuneloop.data.records import record_key, write_jsonl as write_records

    rows = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": False},
            {"prompt": "q", "completion": "b", "label": True}]
    recs = read_records(str(write_jsonl(tmp_path / "k.jsonl", rows))).records
    assert len({record_key(r) for r in recs}) == 3
    pairs = read_records(str(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1}])))
    assert record_key(pairs.records[0]) != record_key(pairs.records[1])
    for res in (recs, pairs.records):
        write_records(tmp_path / "out.jsonl", res)
        back = read_records(str(tmp_path / "out.jsonl")).records
        assert [record_key(r) for r in back] == [record_key(r) for r in res]


def test_preference_recipes_read_pairs_and_split_them_for_kto(tmp_path):
    from tuneloop.data.validate import read_preferences

    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                           {"chosen": "c", "rejected": "d"}])
    res = read_preferences(str(p))
    assert len(res.records) == 1 and res.problems == [f"{p}:2: prompt: missing (the answers need the prompt they reply to)"]
    unpaired = read_preferences(str(p), unpaired=True)
    assert [(r.completion, r.label) for r in unpaired.records] == [("a", "desirable"), ("b", "undesirable")]
    k = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": 1}])
    assert read_preferences(str(k), unpaired=True).records[0].kind == "kto"
    with pytest.raises(DataError, match="the file is kto data; this recipe reads preference"):
        read_preferences(str(k))
    code, out = run_cli("data", "check", k)
    assert code == 0 and "kto" in out, out
