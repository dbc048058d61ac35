"""The CLI prints one line for a user error and exits with a code that says what happened."""

import json

import pytest
from data_helpers import run_cli_split as run_cli  # noqa: E402  (one way to call the real CLI)


def test_help_on_every_command(monkeypatch, capsys):
    for args in ([], ["quickstart"], ["train"], ["eval"], ["models", "list"], ["recipe", "keys"], ["gate"]):
        code, out, err = run_cli(monkeypatch, capsys, *args, "--help")
        assert code == 0 and "Usage" in out


def test_missing_recipe_file(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "r.yaml"), "-w", str(tmp_path))
    assert code == 3 and "r.yaml: recipe file not found" in err and "Traceback" not in err + out


def test_unknown_model_name(monkeypatch, capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "r.yaml").write_text("name: r\nmodel: gpt-17\ndata: {train: d.jsonl}\n")
    code, out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "r.yaml"), "-w", str(tmp_path / "ws"))
    assert code == 3 and "model 'gpt-17': unknown name" in err and "smollm2-135m-instruct" in err
    assert "Traceback" not in err + out


def test_bad_data_is_one_line_per_record_and_exit_1(monkeypatch, capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "zz"}\n')
    (tmp_path / "r.yaml").write_text("name: r\ndata: {train: d.jsonl, labels: [x, y]}\n")
    code, out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "r.yaml"), "-w", str(tmp_path / "ws"))
    assert code == 1 and "d.jsonl:2: label: unknown label 'zz' (allowed: x, y)" in err


def test_bad_recipe_key_exit_2(monkeypatch, capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("name: r\ndata: {train: d.jsonl}\n")
    code, _, err = run_cli(monkeypatch, capsys, "recipe", "check", str(tmp_path / "r.yaml"), "--set", "train.bogus=1")
    assert code == 2 and "train.bogus: unknown key" in err


def test_eval_of_missing_run(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "eval", "nope", "-w", str(tmp_path))
    assert code == 3 and "nope: no such run folder" in err


def test_models_list(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "models", "list")
    assert code == 0 and "smollm2-135m-inst" in out and "minilm-l6" in out


@pytest.mark.slow
def test_train_and_eval_commands_on_csv_with_column_mapping(monkeypatch, capsys, tmp_path, tiny_llama_dir):
    lines = ["body,verdict"] + [f"item {i} was {'fine' if i % 2 else 'poor'},{'up' if i % 2 else 'down'}" for i in range(24)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text(
        f"name: csvrun\nmodel: {tiny_llama_dir}\n"
        "data: {train: d.csv, test: d.csv, text_field: body, label_field: verdict}\n"
        "train: {max_steps: 2, batch_size: 8, precision: fp32, threads: 1}\n"
    )
    ws = tmp_path / "ws"
    code, out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "r.yaml"), "-w", str(ws), "--no-progress")
    assert code == 0, err
    run_dir = next((ws / "runs").iterdir())
    code, out, err = run_cli(monkeypatch, capsys, "eval", run_dir.name, "-w", str(ws), "--data", str(tmp_path / "d.csv"),
                             "--systems", "tuned,tfidf_logreg", "--no-progress")
    assert code == 0, err
    rep = json.loads((run_dir / "report.json").read_text())
    assert set(rep["systems"]) == {"tuned", "tfidf_logreg"} and rep["test"]["n"] == 24
