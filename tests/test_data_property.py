"""Property: whatever is wrong with a data file, `tuneloop data check` exits 1 with a message naming a line,
and never raises. Files are valid records with malformed ones mixed in at random places."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from data_helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)
good = st.builds(lambda t, l: json.dumps({"text": t, "label": l}).encode(), texts, st.sampled_from(["a", "b"]))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda c: st.lists(c, max_size=3), max_leaves=5)

# Each strategy yields one line that is wrong in a different way (among text+label records: a text-only
# line is fine alone, but missing its label here).
bad = st.one_of(
    good.flatmap(lambda g: st.integers(1, len(g) - 1).map(lambda k: g[:k])),  # truncated JSON
    json_values.map(lambda v: json.dumps(v).encode()),  # not an object
    st.builds(lambda t, v: json.dumps({"text": t, "label": v}).encode(), texts,  # label of the wrong type
              st.lists(texts, max_size=2) | st.booleans() | st.dictionaries(texts, texts, max_size=1)),
    st.builds(lambda t: json.dumps({"text": t}).encode(), texts),  # label missing
    st.builds(lambda l: json.dumps({"text": " " * 3, "label": l}).encode(), st.sampled_from(["a", "b"])),  # empty
    st.builds(lambda t: json.dumps({"text": 5, "label": t}).encode(), texts),  # text is a number
    st.binary(min_size=1, max_size=20).map(lambda b: b"\xff" + b.replace(b"\n", b"")),  # not UTF-8
    st.builds(lambda t: json.dumps({"messages": [{"role": "robot", "content": t}]}).encode(), texts),  # other shape
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(goods=st.lists(good, min_size=1, max_size=6), bads=st.lists(bad, min_size=1, max_size=3), data=st.data(),
       crlf=st.booleans())
@pytest.mark.slow
def test_malformed_files_fail_cleanly_naming_a_line(goods, bads, data, crlf):
    lines = list(goods)
    for b in bads:
        lines.insert(data.draw(st.integers(0, len(lines))), b)
    content = (b"\r\n" if crlf else b"\n").join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "gen.jsonl"
        p.write_bytes(content)
        code, out = run_cli("data", "check", str(p))
    assert "Traceback" not in out
    assert code == 1, out
    assert re.search(r"gen\.jsonl:\d+: ", out), out


csv_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=',"\r\n'),
                   min_size=1, max_size=12).filter(str.strip)
csv_bad = st.one_of(
    st.lists(csv_cell, min_size=3, max_size=5).map(lambda cs: ",".join(cs).encode()),  # ragged: too many fields
    csv_cell.map(lambda c: c.encode()),  # ragged: one field
    csv_cell.map(lambda c: f"{c},".encode()),  # empty label
    st.binary(min_size=1, max_size=10).map(lambda b: b"\xfe" + b.replace(b"\n", b"").replace(b"\r", b"") + b",a"),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(goods=st.lists(st.builds(lambda c, l: f"{c},{l}".encode(), csv_cell, st.sampled_from("ab")), min_size=1,
                      max_size=5), bads=st.lists(csv_bad, min_size=1, max_size=2), data=st.data())
@pytest.mark.slow
def test_malformed_csv_fails_cleanly_naming_a_line(goods, bads, data):
    lines = list(goods)
    for b in bads:
        lines.insert(data.draw(st.integers(0, len(lines))), b)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "gen.csv"
        p.write_bytes(b"text,label\n" + b"\n".join(lines) + b"\n")
        code, out = run_cli("data", "check", str(p))
    assert "Traceback" not in out
    assert code == 1, out
    assert re.search(r"gen\.csv:\d+: ", out), out
