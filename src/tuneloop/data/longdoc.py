"""Long inputs: how much of each text a classifier reading `room` tokens misses, and where the label
evidence is likely lost. Said before training (train/classify.py) and in the data report, with the ways
out (`WAYS_OUT`).

Where the evidence is: the words that best tell the labels apart (smoothed log-odds of a word's document
frequency in one label against the rest, at least 1, among words in at least 5 texts) are located in each text; the
share of their occurrences that lie past the cut is the evidence the reading loses. The cut's character
position is the text's length times the share of its tokens read (tokens are not equally long: an
estimate, said so). For e-mails, the share of what is read that is routing headers is given too.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

from .email import header_block

MOST = 0.5  # "most inputs": the warning's threshold on the share cut
TOP_WORDS = 50
MIN_DF = 5
MIN_LOG_ODDS = 1.0  # a word at least e times likelier (in odds) in one label than in the rest
_WORD = re.compile(r"[a-z][a-z']{2,}")

WAYS_OUT = {
    "chunk": "data.long_inputs: chunk reads the whole text in overlapping windows of train.max_length tokens "
             "(data.chunk_overlap, data.max_chunks) pooled into one prediction (data.chunk_pooling), trained end to end",
    "middle": "data.truncate: middle keeps the first and last halves of the room (evidence at the end survives)",
    "longer": "a longer train.max_length / eval.max_length reads further (cost grows with it; check train.time_budget)",
    "email": "data.clean: email keeps the subject and body of e-mails, dropping routing headers, quoted replies "
             "and signatures (or `tuneloop data clean --email` as a logged data-studio step)",
}


def indicative_words(texts: list[str], labels: list[str], top: int = TOP_WORDS) -> set[str]:
    """The `top` words whose presence best separates one label from the others (see the module doc)."""
    df: dict[str, Counter] = {}
    per_label = Counter(labels)
    for t, y in zip(texts, labels):
        for w in set(_WORD.findall(t.lower())):
            df.setdefault(w, Counter())[y] += 1
    scored = []
    for w, c in df.items():
        total = sum(c.values())
        if total < MIN_DF:
            continue
        best = 0.0
        for y, n_y in per_label.items():
            rest = len(texts) - n_y
            if not rest:
                continue
            p, q = (c[y] + 1) / (n_y + 2), (total - c[y] + 1) / (rest + 2)
            best = max(best, abs(math.log(p / (1 - p)) - math.log(q / (1 - q))))
        if best >= MIN_LOG_ODDS:
            scored.append((best, w))
    return {w for _, w in sorted(scored, reverse=True)[:top]}


def long_input_check(texts: list[str], labels: list[str] | None, lengths: list[int], room: int) -> dict:
    """JSON-able: `room` (text tokens read), `records`, `cut` (how many are longer), `share_cut`,
    `median_tokens`, `p90_tokens`, `most_cut` (share_cut > MOST), `evidence_past_cut` (share of the
    label-indicative words' occurrences past the cut, None without labels or such words),
    `read_is_headers` (median share of what is read that is an e-mail header block, over the texts that
    start with one; None if none do), `emails` (how many do), `ways_out` (lines to offer)."""
    n = len(texts)
    cut = [i for i, k in enumerate(lengths) if k > room]
    out: dict = {"room": room, "records": n, "cut": len(cut), "share_cut": round(len(cut) / n, 4) if n else 0.0,
                 "median_tokens": statistics.median(lengths) if lengths else 0,
                 "p90_tokens": sorted(lengths)[int(0.9 * (n - 1))] if lengths else 0}
    out["most_cut"] = out["share_cut"] > MOST
    positions = [len(t) * min(1.0, room / k) if k else len(t) for t, k in zip(texts, lengths)]
    out["evidence_past_cut"] = None
    if labels is not None and len(set(labels)) > 1:
        words = indicative_words(texts, labels)
        inside = past = 0
        for t, at in zip(texts, positions):
            for m in _WORD.finditer(t.lower()):
                if m.group() in words:
                    if m.start() < at:
                        inside += 1
                    else:
                        past += 1
        if inside + past:
            out["evidence_past_cut"] = round(past / (inside + past), 4)
    heads = [(header_block(t), at) for t, at in zip(texts, positions)]
    shares = [min(1.0, h / at) for h, at in heads if h and at]
    out["emails"] = len(shares)
    out["read_is_headers"] = round(statistics.median(shares), 4) if shares else None
    ways = ["chunk", "middle", "longer"] + (["email"] if shares else [])
    out["ways_out"] = [WAYS_OUT[w] for w in ways]
    return out


def long_input_lines(check: dict) -> list[str]:
    """The warning, as lines for the log (empty when most inputs fit)."""
    if not check["most_cut"]:
        return []
    lines = [f"long inputs: {check['cut']} of {check['records']} texts ({check['share_cut']:.0%}) are longer "
             f"than the {check['room']} text tokens read (median {check['median_tokens']:.0f}, 90th percentile "
             f"{check['p90_tokens']}); the rest of each is never seen"]
    if check["evidence_past_cut"] is not None:
        lines.append(f"  {check['evidence_past_cut']:.0%} of the occurrences of the words that best tell the labels "
                     "apart lie past the cut (estimated)")
    if check["read_is_headers"] is not None:
        lines.append(f"  {check['emails']} texts are e-mails; routing headers fill {check['read_is_headers']:.0%} "
                     "of what is read (median)")
    lines.append("  ways out:")
    lines += [f"    - {w}" for w in check["ways_out"]]
    return lines
