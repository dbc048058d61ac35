"""The data report: JSON content, HTML with embedded plots, and (browser tier) that Chromium shows them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from data_helpers import run_cli, write_jsonl


def _rows():
    import random

    rng = random.Random(0)
    words = "tea coffee jar box chips sauce stale fresh late early broken sweet salty soft bag lid price".split()
    rows = []
    for i in range(60):
        body = " ".join(rng.choice(words) for _ in range(12))
        if i % 3 == 0:
            rows.append({"text": f"my wife loved it: {body}", "label": "great"})
        else:
            rows.append({"text": f"arrived {body}", "label": "other"})
    rows.append(dict(rows[1]))  # exact duplicate
    rows.append({"text": rows[2]["text"] + ".", "label": "other"})  # near duplicate
    rows.append({"text": "email me: someone@example.org", "label": "other"})
    rows.append({"text": "", "label": "great"})  # unusable
    return rows


@pytest.mark.slow
def test_report_json_and_html(tmp_path, smol_dir):
    p = write_jsonl(tmp_path / "d.jsonl", _rows())
    code, out = run_cli("data", "report", p, "-o", tmp_path / "rep", "--model", smol_dir)
    assert code == 0, out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["counts"] == {"rows": 64, "usable": 63, "unusable": 1, "augmented": 0}
    assert rep["labels"] == {"other": 43, "great": 20}
    assert rep["duplicates"]["exact"] == 1 and rep["duplicates"]["near"] == 1
    assert rep["pii"]["hits"] == {"email": 1}
    assert rep["tokens"]["min"] > 0 and rep["tokens"]["model"] == str(smol_dir)
    # gender terms appear in every 'great' record and in no 'other' record: flagged as skew
    assert [s["category"] for s in rep["bias"]["skewed"]] == ["gender"]
    fix = rep["fix_first"]
    assert fix[0].startswith("fix or drop 1 unusable") and any("at least 500 per class" in f for f in fix)
    assert any("gender terms appear" in f for f in fix)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # labels, token lengths, PII, bias


def test_report_generation_size_advice_and_regression(tmp_path, smol_dir):
    (tmp_path / "t.csv").write_text("day,riders\n" + "".join(f"day {i},{i * 1.5}\n" for i in range(30)))
    code, out = run_cli("data", "report", tmp_path / "t.csv", "-o", tmp_path / "rep", "--model", smol_dir,
                        "--map", "text=day", "--map", "value=riders")
    assert code == 0, out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["task"] == "regress" and rep["values"]["max"] == 43.5
    assert any("aim for at least 1000" in f for f in rep["fix_first"])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install -y chromium)")
def test_report_plots_show_in_headless_chromium(tmp_path, smol_dir):
    import matplotlib.image as mpimg
    import numpy as np

    p = write_jsonl(tmp_path / "d.jsonl", _rows())
    assert run_cli("data", "report", p, "-o", tmp_path / "rep", "--model", smol_dir)[0] == 0
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,2600", f"--screenshot={shot}", (tmp_path / "rep" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)[..., :3]
    # the label-balance bars (#4c72b0) and the token histogram (#55a868) are drawn: their colours are on screen
    for rgb in ((0x4C, 0x72, 0xB0), (0x55, 0xA8, 0x68)):
        close = np.abs(img - np.array(rgb) / 255).max(axis=-1) < 0.03
        assert close.sum() > 500, f"colour {rgb} not found: plot not rendered"


def test_unknown_model_is_one_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", _rows())
    code, out = run_cli("data", "report", p, "-o", tmp_path / "rep", "--model", "no-such-org/no-such-model")
    assert code == 3 and "--model no-such-org/no-such-model: cannot load its tokenizer" in out and "Traceback" not in out
    assert not (tmp_path / "rep").exists()
