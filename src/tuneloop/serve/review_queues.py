"""What goes into a review queue: a run's test-set answers, or blind pairs of two systems' answers to the
same test prompts, read from the evaluation reports (eval/schema.py) and queued in the feedback store.

A report keeps each example's reference and every system's answer, and keys the example by a hash of its
prompt; the prompt itself is read back from the test set the report names and checked against that key,
so a test file edited since the evaluation is refused rather than paired with the wrong answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, DataError, NotFoundError
from ..fileio import read_json
from ..runs import REPORT_JSON, TEST_RECORDS, Run, open_run


def open_report(target: str, workspace: Path | None) -> tuple[dict, Path, str]:
    """A report.json, a run folder (or a run's name) holding one, or a registry ref `NAME:VERSION` /
    `NAME@ALIAS` → (the report, its path, the name its systems are shown under once revealed)."""
    p = Path(target).expanduser()
    label = None
    if not p.exists() and (":" in target or "@" in target):
        from .. import registry

        if registry.is_ref(target):
            if workspace is None:
                raise ConfigError(f"{target}: a registry ref needs a workspace (-w)")
            version = registry.resolve(workspace, target)
            p, label = version.run_dir, version.ref
    if p.is_file():
        return read_json(p), p, label or p.parent.name
    if not p.is_dir() and workspace is not None and (Path(workspace) / "runs" / target).is_dir():
        p = Path(workspace) / "runs" / target
    if p.is_dir():
        f = p / REPORT_JSON
        if not f.exists():
            raise NotFoundError(f"{p}: no {REPORT_JSON}; evaluate it first (`tuneloop eval {p}`)")
        return read_json(f), f, label or p.name
    raise NotFoundError(f"{target}: neither a report.json, a run folder nor a registered version")


def _run_of(report: dict, report_path: Path) -> Run | None:
    for cand in (report.get("run"), report_path.parent):
        if cand and Path(cand).is_dir():
            try:
                return open_run(cand)
            except (NotFoundError, ConfigError):
                continue
    return None


def _records(report: dict, report_path: Path) -> list:
    """The test records the report was evaluated on, read the way the evaluation read them."""
    from ..data.chat import load_chat
    from ..data.records import Record

    path = report.get("test", {}).get("path")
    run = _run_of(report, report_path)
    if path and run is not None and Path(path).name == TEST_RECORDS and Path(path).resolve() == \
            (run.dir / TEST_RECORDS).resolve():
        f = run.dir / TEST_RECORDS
        return [Record(messages=json.loads(line)["messages"], source=f"{f}:{i}")
                for i, line in enumerate(f.read_text().splitlines(), start=1) if line.strip()]
    if not path:
        raise DataError(f"{report_path}: test.path: the report does not say which test set it used")
    fmt = run.recipe.data.format if run is not None and run.recipe.data.test == path else "auto"
    if not Path(path).exists():
        raise NotFoundError(f"{report_path}: test.path: {path} is not on this machine; the prompts live there")
    return load_chat(path, fmt)


def prompts_by_example(report: dict, report_path: Path) -> dict[str, list[dict]]:
    """Example id → its prompt (the chat turns before the answer), checked against the report's key."""
    from ..eval.schema import example_key

    if report.get("task") != "sft":
        raise ConfigError(f"{report_path}: task {report.get('task')!r}: review queues take answers from sft "
                          f"reports (generated text)")
    records = _records(report, report_path)
    out = {}
    for ex in report["examples"]:
        i = ex["index"]
        if i >= len(records):
            raise DataError(f"{report_path}: examples[{i}]: the test set has only {len(records)} records now")
        prompt = records[i].messages[:-1]
        if example_key(json.dumps(prompt, ensure_ascii=False)) != ex["key"]:
            raise DataError(f"{records[i].source}: this prompt is not the one the report evaluated as example "
                            f"{ex['id']} (the test set changed since); evaluate again")
        out[ex["id"]] = prompt
    return out


def _system(report: dict, report_path: Path, name: str) -> dict:
    preds = report.get("predictions", {})
    if name not in preds:
        raise ConfigError(f"{report_path}: no system {name!r} (systems: {', '.join(preds) or 'none'})")
    return preds[name]


def answer_items(target: str, workspace: Path | None, system: str = "tuned") -> list[dict]:
    """A run's (or report's) test-set answers by one system, as `enqueue_answers` items."""
    report, path, label = open_report(target, workspace)
    prompts = prompts_by_example(report, path)
    preds = _system(report, path, system)
    refs = {e["id"]: e.get("reference") for e in report["examples"]}
    return [{"prompt": prompts[eid], "answer": p["text"], "source": f"{label}/{system}", "response_id": None,
             "example_id": eid, "reference": refs.get(eid)}
            for eid, p in preds.items() if p is not None and eid in prompts]


def pair_items(target: str, workspace: Path | None, a: str = "base", b: str = "tuned",
               other: str | None = None) -> list[dict]:
    """Blind pairs on the same test prompts, as `enqueue_pairs` items: systems `a` and `b` of one report,
    or (with `other`) system `a` of `target` against system `b` of `other`, matched by example id; the
    reports must come from the same test set (same fingerprint)."""
    report, path, label = open_report(target, workspace)
    prompts = prompts_by_example(report, path)
    if other is None:
        if a == b:
            raise ConfigError(f"--a {a} --b {b}: pair two different systems")
        report_b, path_b, label_b = report, path, label
    else:
        report_b, path_b, label_b = open_report(other, workspace)
        fa, fb = report.get("test", {}).get("fingerprint"), report_b.get("test", {}).get("fingerprint")
        if not fa or fa != fb:
            raise ConfigError(f"{path} and {path_b}: evaluated on different test sets (fingerprints {fa} and "
                              f"{fb}); pairs must answer the same prompts")
        if label_b == label:
            label_b = str(path_b.parent)
    pa, pb = _system(report, path, a), _system(report_b, path_b, b)
    sa, sb = f"{label}/{a}", f"{label_b}/{b}"
    return [{"prompt": prompts[eid], "answer_a": pa[eid]["text"], "source_a": sa, "answer_b": pb[eid]["text"],
             "source_b": sb, "example_id": eid}
            for eid in prompts if pa.get(eid) is not None and pb.get(eid) is not None]

