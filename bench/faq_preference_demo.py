"""The preference demonstration, end to end and offline: the construction FAQ, SFT then DPO, evaluated on
the held-out questions beside the base model and the SFT run, with a separately trained reward model as
the judge.

    python bench/faq_preference_demo.py [--workspace DIR] [--quick]

1. SFT: recipes/faq-assistant-sft.yaml (SmolLM2-135M-Instruct, LoRA; 50 of the 503 Q&As held out).
2. Pairs: `tuneloop data pairs` on the SFT run's training split: the firm's answer is `chosen`, the base
   model's own greedy answer `rejected` (near-identical pairs dropped); the same on its test split gives
   the held-out pairs, used for evaluation only.
3. The judge: recipes/faq-reward.yaml, a reward model trained on the training pairs.
4. DPO: recipes/faq-dpo.yaml from the SFT run (its adapter merged, a new LoRA on top; the reference is the
   SFT model).
5. `tuneloop eval DPO_RUN --judge JUDGE`: base / SFT / SFT+DPO on the held-out pairs: preference accuracy
   (implicit reward against the SFT model), win rate against the SFT model's answers by the judge, ROUGE-L
   and perplexity of the firm's answers.

Full size fits about 25 minutes on the shared 2-core CPU; `--quick` is the smallest run that exercises every
step (a few steps each, a few records; its numbers mean nothing). The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

BASE = "smollm2-135m-instruct"
LABELS = {"base": "base", "parent": "SFT", "tuned": "SFT+DPO"}

# (SFT overrides, pairs: max_new_tokens / records per split, judge and DPO overrides, eval overrides)
SIZES = {
    "full": {"sft": [], "pairs_tokens": 96, "pairs_records": None, "judge": [], "dpo": [], "eval": []},
    # the full SFT, then pairs from the first 200 training questions only (judge and DPO train on those):
    # about half the time of `full`
    "medium": {"sft": [], "pairs_tokens": 96, "pairs_records": 200, "judge": [], "dpo": [], "eval": []},
    "quick": {"sft": ["train.max_steps=2", "train.compile=false", "train.eval_every=2", "train.checkpoint_every=2"],
              "pairs_tokens": 24, "pairs_records": 12,
              "judge": ["train.max_steps=2", "train.eval_every=2"],
              "dpo": ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2"],
              "eval": ["eval.max_new_tokens=24", "eval.max_test_examples=8"]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=ROOT / "workspace-faq-preference")
    ap.add_argument("--quick", action="store_true", help="The smallest run that exercises every step.")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="full (default), medium, quick")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="Keep the finished SFT run, pairs and judge already in the workspace (a rerun after an "
                         "interruption); the result says which steps were reused.")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from tuneloop.config import load_recipe
    from tuneloop.eval.tasks import evaluate_run
    from tuneloop.pairs import make_pairs
    from tuneloop.runs import workspace_path
    from tuneloop.train import train_run

    console = Console()
    size_name = args.size or ("quick" if args.quick else "full")
    size = SIZES[size_name]
    ws = workspace_path(args.workspace)
    show = not args.no_progress
    seconds: dict[str, float] = {}
    t_all = time.time()

    def step(name: str):
        console.rule(f"[bold]{name}")
        return time.time()

    reused: list[str] = []

    def finished(name: str):
        """The newest finished run of this recipe name in the workspace, with its metrics (--reuse)."""
        from tuneloop.runs import open_run

        for d in sorted((ws / "runs").glob(f"{name}-*"), reverse=True) if args.reuse else []:
            try:
                run = open_run(d)
            except Exception:
                continue
            if run.info.status == "finished":
                reused.append(name)
                return d, run.info.metrics or {}
        return None

    t = step("1. SFT on the FAQ's training split")
    sft_run, sft_metrics = finished("faq-assistant") or train_run(
        load_recipe(ROOT / "recipes" / "faq-assistant-sft.yaml", size["sft"]), ws, show)
    seconds["sft"] = time.time() - t
    console.print(f"SFT run: {sft_run}")

    t = step("2. Preference pairs: the firm's answers over the base model's own")
    pairs_dir = ws / "faq-pairs"
    train_pairs, test_pairs = pairs_dir / "train.jsonl", pairs_dir / "test.jsonl"
    made = {}
    for split, out in (("train", train_pairs), ("test", test_pairs)):
        if args.reuse and out.exists() and (out.parent / f".{split}.made.json").exists():
            made[split] = json.loads((out.parent / f".{split}.made.json").read_text())
            reused.append(f"pairs:{split}")
            continue
        made[split] = make_pairs(out, BASE, recipe_path=sft_run, split=split, max_new_tokens=size["pairs_tokens"],
                                 max_records=size["pairs_records"], workspace=ws, show_progress=show)
        d = made[split]["dropped"]
        console.print(f"{split}: {made[split]['pairs']} pairs from {made[split]['records']} records "
                      f"({d['near_identical']} near-identical dropped)", highlight=False)
        console.print(made[split]["note"], highlight=False, soft_wrap=True)
        (out.parent / f".{split}.made.json").write_text(json.dumps(made[split]))
    seconds["pairs"] = time.time() - t
    data = [f"data.train={train_pairs}", f"data.test={test_pairs}"]

    t = step("3. The judge: a reward model on the training pairs")
    judge_run, _ = finished("faq-reward") or train_run(
        load_recipe(ROOT / "recipes" / "faq-reward.yaml", data + size["judge"]), ws, show)
    judge_report = evaluate_run(judge_run, show_progress=show)
    seconds["judge"] = time.time() - t
    console.print(f"judge run: {judge_run}; held-out preference accuracy "
                  + ", ".join(f"{n} {m['preference_accuracy']:.3f}" for n, m in judge_report["systems"].items()))

    t = step("4. DPO from the SFT run")
    dpo_run, dpo_metrics = train_run(load_recipe(ROOT / "recipes" / "faq-dpo.yaml",
                                                 [f"model={sft_run}", *data, *size["dpo"], *size["eval"]]), ws, show)
    seconds["dpo"] = time.time() - t
    console.print(f"DPO run: {dpo_run}")

    t = step("5. Evaluation on the held-out questions")
    report = evaluate_run(dpo_run, show_progress=show, judge=str(judge_run))
    seconds["eval"] = time.time() - t
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(time.time() - t_all, 1)

    iv = report.get("intervals", {})
    table = Table(title=f"construction FAQ, {report['test']['n']} held-out questions (pairs: firm's answer vs "
                        f"base model's); judge: reward model, held-out accuracy "
                        f"{judge_report['systems']['tuned']['preference_accuracy']:.3f}")
    for c in ("system", "preference accuracy ↑", "win rate vs SFT ↑", "ROUGE-L ↑", "perplexity ↓"):
        table.add_column(c)
    rows = {}
    for name, m in report["systems"].items():
        pa = m["preference_accuracy"]
        pa_iv = iv.get(name, {}).get("preference_accuracy")
        wr = m["win_rate_vs_parent"]
        wr_iv = iv.get(name, {}).get("win_rate_vs_parent")
        table.add_row(LABELS[name],
                      "reference (0.5)" if pa is None else f"{pa:.3f} [{pa_iv[0]:.2f}, {pa_iv[1]:.2f}]",
                      "-" if wr is None else f"{wr:.3f} [{wr_iv[0]:.2f}, {wr_iv[1]:.2f}]",
                      f"{m['rougeL']:.4f}", f"{m['perplexity']:.2f}")
        rows[LABELS[name]] = {"preference_accuracy": pa, "preference_accuracy_interval": pa_iv,
                              "win_rate_vs_sft": wr, "win_rate_vs_sft_interval": wr_iv,
                              "win_rate_vs_base": m["win_rate_vs_base"], "rougeL": m["rougeL"],
                              "perplexity": m["perplexity"], "likelihood_accuracy": m["likelihood_accuracy"]}
    console.print(table)
    for n in report["notes"]:
        console.print(f"note: {n}", highlight=False, soft_wrap=True)
    console.print(f"report: {Path(dpo_run) / 'report.html'}")
    result = {
        "size": size_name, "held_out": report["test"]["n"],
        "train_pairs": made["train"]["pairs"], "train_pairs_dropped": made["train"]["dropped"],
        "test_pairs": made["test"]["pairs"], "systems": rows,
        "judge_preference_accuracy": {n: m["preference_accuracy"] for n, m in judge_report["systems"].items()},
        "sft_steps": sft_metrics.get("steps"), "dpo_steps": dpo_metrics.get("steps"),
        "runs": {"sft": str(sft_run), "judge": str(judge_run), "dpo": str(dpo_run)}, "seconds": seconds,
        "reused": reused,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
