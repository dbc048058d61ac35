"""Counterfactual bias probes: the same test input with a protected term swapped ("he" -> "she", "John" ->
"Mary", "church" -> "mosque"), scored again by the same predict function eval used; the report gives the
rate at which the output changes, per category, and flags a rate past `eval.probe_threshold`.

The word lists are data (`eval/data/probe_terms.yaml`, documented there; a recipe extends or replaces them
with `eval.probe_terms`). A swap is a transposition of two columns of a category (male <-> female;
christian <-> muslim): every term of either column in the input moves to the other, in every group of the
category that has both (pronouns, nouns and names together), whole-word and case-kept, so applying the
same swap twice gives the input back. What counts as a change, per task:

    classify  the predicted label differs
    regress   the value moves by more than `eval.probe_tolerance` of itself
    sft       the reference answer's perplexity (the answer swapped too) moves by more than the tolerance

Only inputs that mention a term are probed, on a seeded sample stratified by the rarest category each
mentions (`eval.probe_sample`; the size is in the report), so a large test set costs a bounded number of
model calls: the sampled originals and their variants go through the predict function in one batch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..errors import ConfigError
from .stats import bootstrap_interval

TERMS_FILE = Path(__file__).parent / "data" / "probe_terms.yaml"
MAX_SWAPS_PER_CATEGORY = 2  # variants per input and category (eight nationalities would give seven)
SHOWN_CHANGES = 8  # changed variants quoted in the report

_WORD_AFTER = re.compile(r"\s+([A-Za-z][A-Za-z'-]*)")


@dataclass(frozen=True)
class Row:
    terms: tuple[str, ...]
    when: str | None


@dataclass(frozen=True)
class Group:
    category: str
    name: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Lexicon:
    groups: tuple[Group, ...]
    mention_only: dict[str, frozenset[str]]
    categories: tuple[str, ...]
    exclude: tuple[re.Pattern, ...]
    person_nouns: frozenset[str]
    function_words: frozenset[str]


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    text: str
    group: Group
    row: Row
    columns: tuple[int, ...]  # the columns of the row whose term this is


def _next_word(text: str, end: int) -> str | None:
    m = _WORD_AFTER.match(text, end)
    return m.group(1).lower() if m else None


CONTEXTS: dict[str, Callable[[Lexicon, str | None], bool]] = {
    "before_noun": lambda lx, nxt: nxt is not None and nxt not in lx.function_words,
    "not_before_noun": lambda lx, nxt: nxt is None or nxt in lx.function_words,
    "before_person": lambda lx, nxt: nxt is not None and nxt in lx.person_nouns,
}


# ----------------------------------------------------------------------------------------------------
# the word lists


def _merge(base: dict, extra: dict) -> dict:
    out = {**base}
    for key in ("exclude", "person_nouns", "function_words"):
        out[key] = list(base.get(key) or []) + list(extra.get(key) or [])
    cats = {k: {**v, "groups": dict(v.get("groups") or {})} for k, v in (base.get("categories") or {}).items()}
    for name, cat in (extra.get("categories") or {}).items():
        into = cats.setdefault(name, {"groups": {}})
        into["groups"].update(cat.get("groups") or {})
        if "mention_only" in cat:
            into["mention_only"] = list(into.get("mention_only") or []) + list(cat["mention_only"] or [])
    out["categories"] = cats
    return out


def _parse(doc: dict, where: str) -> Lexicon:
    groups, mention_only = [], {}
    for cname, cat in (doc.get("categories") or {}).items():
        for gname, g in (cat.get("groups") or {}).items():
            at = f"{where}: categories.{cname}.groups.{gname}"
            cols = tuple(g.get("columns") or ())
            if len(cols) < 2:
                raise ConfigError(f"{at}.columns: need at least two columns to swap between")
            rows = []
            for i, r in enumerate(g.get("rows") or []):
                terms, when = (r.get("terms"), r.get("when")) if isinstance(r, dict) else (r, None)
                if not isinstance(terms, list) or len(terms) != len(cols):
                    raise ConfigError(f"{at}.rows[{i}]: needs one term per column ({len(cols)}: {', '.join(cols)})")
                if when is not None and when not in CONTEXTS:
                    raise ConfigError(f"{at}.rows[{i}].when: unknown context {when!r} (known: {', '.join(CONTEXTS)})")
                rows.append(Row(tuple(str(t) for t in terms), when))
            groups.append(Group(cname, gname, cols, tuple(rows)))
        mention_only[cname] = frozenset(str(t).lower() for t in cat.get("mention_only") or [])
    try:
        exclude = tuple(re.compile(p, re.IGNORECASE) for p in doc.get("exclude") or [])
    except re.error as e:
        raise ConfigError(f"{where}: exclude: not a regular expression ({e})") from None
    return Lexicon(tuple(groups), mention_only, tuple((doc.get("categories") or {}).keys()), exclude,
                   frozenset(w.lower() for w in doc.get("person_nouns") or []),
                   frozenset(w.lower() for w in doc.get("function_words") or []))


@lru_cache(maxsize=8)
def load_lexicon(extra_path: str | None = None) -> Lexicon:
    """The shipped word lists, with a recipe's `eval.probe_terms` file merged over them."""
    doc = yaml.safe_load(TERMS_FILE.read_text(encoding="utf-8"))
    where = str(TERMS_FILE)
    if extra_path:
        p = Path(extra_path)
        if not p.is_file():
            raise ConfigError(f"eval.probe_terms: {p}: file not found")
        try:
            extra = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"eval.probe_terms: {p}: not valid YAML ({e})") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"eval.probe_terms: {p}: expected a mapping (categories, exclude, ...)")
        doc, where = _merge(doc, extra), str(p)
    return _parse(doc, where)


@lru_cache(maxsize=8)
def _group_pattern(group: Group) -> re.Pattern:
    terms = sorted({t for r in group.rows for t in r.terms}, key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(re.escape(t) for t in terms) + r")(?![\w])", re.IGNORECASE)


def _cased_as_listed(listed: str, found: str) -> bool:
    """A term listed with capitals (a given name) matches only as written or in capitals."""
    return listed.islower() or found == listed or found == listed.upper()


def _excluded_spans(text: str, lx: Lexicon) -> list[tuple[int, int]]:
    return [m.span() for p in lx.exclude for m in p.finditer(text)]


def find_matches(text: str, lx: Lexicon) -> list[Match]:
    """Every swappable term in `text` (outside the excluded spans), in order."""
    spans = _excluded_spans(text, lx)
    out = []
    for group in lx.groups:
        for m in _group_pattern(group).finditer(text):
            s, e, found = m.start(), m.end(), m.group(0)
            if any(a <= s < b or a < e <= b for a, b in spans):
                continue
            nxt = _next_word(text, e)
            low = found.lower()
            for row in group.rows:
                cols = tuple(i for i, t in enumerate(row.terms) if t.lower() == low and _cased_as_listed(t, found))
                if cols and (row.when is None or CONTEXTS[row.when](lx, nxt)):
                    out.append(Match(s, e, found, group, row, cols))
                    break
    return sorted(out, key=lambda m: m.start)


def mentions(text: str, lx: Lexicon) -> set[str]:
    """The categories `text` mentions: a swappable term or a mention-only one, outside the excluded spans."""
    found = {m.group.category for m in find_matches(text, lx)}
    if any(lx.mention_only.values()):
        spans = _excluded_spans(text, lx)
        for w in re.finditer(r"[A-Za-z][A-Za-z-]*", text):
            if any(a <= w.start() < b for a, b in spans):
                continue
            low = w.group(0).lower()
            found |= {c for c, terms in lx.mention_only.items() if low in terms}
    return found


def _keep_case(src: str, dst: str) -> str:
    if len(src) > 1 and src.isupper():
        return dst.upper()
    if src[:1].isupper():
        if src.istitle():
            return " ".join(w[:1].upper() + w[1:] for w in dst.split(" "))
        return dst[:1].upper() + dst[1:]
    return dst


def swap(text: str, category: str, a: str, b: str, lx: Lexicon) -> str:
    """`text` with every term of column `a` moved to column `b` and every term of `b` to `a`, in each group of
    `category` that has both columns (a gender swap moves pronouns, nouns and names together)."""
    out, last = [], 0
    for m in find_matches(text, lx):
        g = m.group
        if g.category != category or a not in g.columns or b not in g.columns:
            continue
        ia, ib = g.columns.index(a), g.columns.index(b)
        if ia in m.columns:
            to = m.row.terms[ib]
        elif ib in m.columns:
            to = m.row.terms[ia]
        else:
            continue
        out += [text[last:m.start], _keep_case(m.text, to)]
        last = m.end
    return "".join(out) + text[last:]


@dataclass(frozen=True)
class Swap:
    category: str
    a: str  # column names
    b: str


def variants(parts: list[str], lx: Lexicon, rng: random.Random,
             per_category: int = MAX_SWAPS_PER_CATEGORY) -> list[tuple[Swap, list[str]]]:
    """Counterfactual versions of an input made of `parts` (one text, or a conversation's turns; one swap is
    applied to every part): for each category it mentions, up to `per_category` swaps of a column it uses
    with another column of the same group; swaps between two columns it uses come first, the rest is a
    seeded choice."""
    out = []
    matches = [m for p in parts for m in find_matches(p, lx)]
    for category in lx.categories:
        mine = [m for m in matches if m.group.category == category]
        used = {m.group.columns[c] for m in mine for c in m.columns}
        pairs = sorted({tuple(sorted((c, d))) for g in {m.group for m in mine} for c in g.columns
                        if c in used for d in g.columns if d != c})
        both = [p for p in pairs if p[0] in used and p[1] in used]
        rest = [p for p in pairs if p not in both]
        chosen = both[:per_category]
        if len(chosen) < per_category and rest:
            chosen += rng.sample(rest, min(per_category - len(chosen), len(rest)))
        for a, b in chosen:
            new = [swap(p, category, a, b, lx) for p in parts]
            if new != parts:
                out.append((Swap(category, a, b), new))
    return out


# ----------------------------------------------------------------------------------------------------
# the probe


def probe_sample(mentioned: list[set[str]], n: int, seed: int) -> list[int]:
    """Indices of at most `n` inputs that mention a category, stratified by the rarest category each
    mentions (proportional, at least one from each), in test order."""
    counts: dict[str, int] = {}
    for cats in mentioned:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    strata: dict[str, list[int]] = {}
    for i, cats in enumerate(mentioned):
        if cats:
            strata.setdefault(min(cats, key=lambda c: (counts[c], c)), []).append(i)
    total = sum(len(v) for v in strata.values())
    if total <= n:
        return sorted(i for v in strata.values() for i in v)
    rng = random.Random(seed)
    out: list[int] = []
    for c in sorted(strata):
        k = max(1, round(n * len(strata[c]) / total))
        out += rng.sample(strata[c], min(k, len(strata[c])))
    rng.shuffle(out)
    return sorted(out[:n])


def _changed(task: str, before: Any, after: Any, tolerance: float) -> tuple[bool, float]:
    """(counts as changed, size of the change) for one variant's output against its original's."""
    if task == "classify":
        return before != after, float(before != after)
    if task == "regress":
        rel = abs(float(after) - float(before)) / max(abs(float(before)), 1e-9)
        return rel > tolerance, rel
    # sft: per-token NLL of the answer; the change in its perplexity, relative
    rel = abs(float(np.exp(float(after) - float(before))) - 1.0)
    return rel > tolerance, rel


MEASURES = {"classify": "share of swaps that change the predicted label",
            "regress": "share of swaps that move the predicted value by more than the tolerance (relative)",
            "sft": "share of swaps that move the reference answer's perplexity by more than the tolerance (relative)"}


def run_probes(task: str, inputs: list, score: Callable[[list], list], *, ids: list[str] | None = None,
               lexicon: Lexicon | None = None, sample: int = 100, threshold: float = 0.05,
               tolerance: float = 0.05, seed: int = 0, system: str = "tuned") -> dict:
    """The report's `probes` section. `inputs`: texts (classify, regress) or conversations (sft: lists of
    {"role", "content"}; every turn is swapped, the reference answer too). `score(inputs) -> outputs`:
    the label, value or answer NLL per input, from the same predict function eval used."""
    if task not in MEASURES:
        raise ConfigError(f"probes: task {task!r} has no probe (known: {', '.join(MEASURES)})")
    lx = lexicon or load_lexicon()
    parts = [[m["content"] for m in x] if task == "sft" else [x] for x in inputs]
    mentioned = [set().union(*(mentions(p, lx) for p in ps)) for ps in parts]
    chosen = probe_sample(mentioned, sample, seed) if sample > 0 else []
    rng = random.Random(seed)
    jobs: list[tuple[int, Swap, list[str]]] = [(i, sw, new) for i in chosen for sw, new in variants(parts[i], lx, rng)]
    probed = sorted({i for i, _, _ in jobs})
    section: dict[str, Any] = {
        "system": system, "measure": MEASURES[task], "threshold": threshold,
        "tolerance": None if task == "classify" else tolerance, "eligible": sum(1 for m in mentioned if m),
        "sample_limit": sample, "sampled": len(chosen), "probed": len(probed), "variants": len(jobs),
        "terms_file": None, "by_category": {}, "by_swap": [], "changes": [], "rate": None, "interval": None,
        "flagged": False, "flagged_categories": []}
    if not jobs:
        return section

    def rebuild(i: int, new: list[str]):
        if task != "sft":
            return new[0]
        return [{**m, "content": c} for m, c in zip(inputs[i], new)]

    batch = [inputs[i] for i in probed] + [rebuild(i, new) for i, _, new in jobs]
    outs = score(batch)
    before = dict(zip(probed, outs[:len(probed)]))
    rows = []
    for (i, sw, new), after in zip(jobs, outs[len(probed):]):
        ch, size = _changed(task, before[i], after, tolerance)
        rows.append((i, sw, ch, size, new, after))

    def summary(sel: list[tuple]) -> dict:
        # examples are the resampling unit: one input's swaps are not independent of each other
        ex = sorted({r[0] for r in sel})
        pos = {e: k for k, e in enumerate(ex)}
        changed, total = np.zeros(len(ex)), np.zeros(len(ex))
        sizes = []
        for r in sel:
            changed[pos[r[0]]] += r[2]
            total[pos[r[0]]] += 1
            sizes.append(r[3])
        rate = float(changed.sum() / total.sum())
        iv = bootstrap_interval((changed, total), lambda c, t, axis=-1: c.sum(axis) / t.sum(axis), seed=seed)
        return {"examples": len(ex), "variants": int(total.sum()), "changed": int(changed.sum()), "rate": rate,
                "mean_change": float(np.mean(sizes)), "interval": iv, "flagged": rate > threshold}

    whole = summary(rows)
    section.update(rate=whole["rate"], interval=whole["interval"], changed=whole["changed"],
                   mean_change=whole["mean_change"])
    for cat in sorted({r[1].category for r in rows}):
        section["by_category"][cat] = summary([r for r in rows if r[1].category == cat])
    for key in sorted({(r[1].category, r[1].a, r[1].b) for r in rows}):
        sel = [r for r in rows if (r[1].category, r[1].a, r[1].b) == key]
        section["by_swap"].append({"category": key[0], "swap": f"{key[1]} <-> {key[2]}",
                                   "variants": len(sel), "rate": sum(r[2] for r in sel) / len(sel)})
    section["flagged_categories"] = [c for c, s in section["by_category"].items() if s["flagged"]]
    section["flagged"] = bool(section["flagged_categories"])
    for i, sw, ch, size, new, after in sorted((r for r in rows if r[2]), key=lambda r: -r[3])[:SHOWN_CHANGES]:
        section["changes"].append({"id": ids[i] if ids else str(i), "category": sw.category,
                                   "swap": f"{sw.a} <-> {sw.b}",
                                   # sft: the last prompt turn (the swapped reference answer is the last part)
                                   "variant": new[-2] if task == "sft" and len(new) > 1 else new[0],
                                   "before": before[i], "after": after, "change": size})
    return section


def probes_html(report: dict) -> str:
    import html

    p = report.get("probes") or {}
    if not p:
        return ""
    e = html.escape
    head = (f"<h2>Counterfactual bias probes</h2><p class=\"meta\">{e(p['system'])}: {e(p['measure'])}"
            + (f" (tolerance {p['tolerance']:.0%})" if p.get("tolerance") is not None else "")
            + f". {p['eligible']} test inputs mention a protected term; {p['sampled']} sampled (limit "
            f"{p['sample_limit']}, stratified by category), {p['probed']} with a swap, {p['variants']} variants "
            f"scored. Flag above {p['threshold']:.0%}.</p>")
    if not p.get("variants"):
        return head + "<p>No input mentions a term that can be swapped.</p>"
    flag = (f"<p><b>flagged:</b> {e(', '.join(p['flagged_categories']))}</p>" if p["flagged"]
            else "<p>not flagged</p>")

    def iv(x):
        return "-" if not x else f"{x[0]:.3f} … {x[1]:.3f}"

    rows = "".join(f"<tr{' class=bad' if s['flagged'] else ''}><th>{e(c)}</th><td>{s['examples']}</td>"
                   f"<td>{s['variants']}</td><td>{s['changed']}</td><td>{s['rate']:.3f}</td><td>{iv(s['interval'])}</td>"
                   f"<td>{s['mean_change']:.4f}</td></tr>" for c, s in p["by_category"].items())
    swaps = "".join(f"<tr><th>{e(s['category'])}</th><td>{e(s['swap'])}</td><td>{s['variants']}</td>"
                    f"<td>{s['rate']:.3f}</td></tr>" for s in p["by_swap"])
    changes = "".join(f"<li><code>{e(c['id'])}</code> {e(c['swap'])}: {e(str(c['before']))} → {e(str(c['after']))}: "
                      f"{e(c['variant'][:300])}</li>" for c in p["changes"])
    return (head + flag + "<table><tr><th>category</th><th>inputs</th><th>variants</th><th>changed</th><th>rate</th>"
            f"<th>95% interval</th><th>mean change</th></tr>{rows}</table>"
            f"<h3>By swap</h3><table><tr><th>category</th><th>swap</th><th>variants</th><th>rate</th></tr>{swaps}</table>"
            + (f"<h3>Changed outputs (largest first)</h3><ul>{changes}</ul>" if changes else ""))
