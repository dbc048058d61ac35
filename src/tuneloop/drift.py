"""Drift: are the inputs a served version sees still like the data it was trained on?

Four checks, each a number with a threshold (and, where sampling noise matters, a p-value):

- `embedding`: the texts as the bundled MiniLM sentence encoder sees them. The value is the cross-validated
  AUC of a domain classifier (logistic regression telling reference from live embeddings: 0.5 means it
  cannot, 1.0 means they never overlap); the p-value is an MMD two-sample permutation test on the same
  embeddings. AUC is the effect size a reader can picture, MMD the significance: with a few dozen live texts
  a cross-validated AUC swings by ±0.1 on its own, and the permutation test says whether it means anything.
- `length`: PSI of text lengths (words) over the reference's deciles.
- `vocabulary`: PSI of word frequencies over the reference's most common words plus one "other" bin (where
  words the training data never used land).
- `labels` (classification): PSI of the predicted label mix against the training label prior, with a
  chi-square goodness-of-fit p-value.
- `rating` (when feedback has ratings): Kendall's tau of rating against time; falling ratings are drift.

A check flags drift only when its effect is past the threshold AND its p-value is under `alpha`: PSI over a
small sample is biased upwards (about (bins - 1) / n under no drift at all, 0.18 for 50 texts in 10 bins),
and a large sample makes a negligible shift significant; both conditions together hold for neither.

Libraries: numpy for the permutation tests (every permutation at once as one matrix product), scikit-learn
for the domain classifier and its cross-validated AUC (and the 2-D projection of the report), scipy for the
chi-square and Kendall tests, transformers for the encoder (mean-pooled, normalised, as sentence-transformers
does for this model). The drift libraries (alibi-detect, evidently, nannyml) would each bring a dependency
tree larger than tuneloop's own for these few tests, and their defaults (feature-wise KS, fixed PSI bins)
would still need the small-sample care above.

Everything is seeded: the same inputs and seed give the same report. Each side is capped at `max_texts`
texts (a seeded sample) so a check takes seconds on a CPU; the report says how many it read.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import DataError

# Thresholds the loop reads. `alpha`: the p-value under which an effect counts. `auc`: a domain classifier
# this good (0.5 is chance) on MiniLM embeddings is a visible change of topic. PSI 0.2 sits between the usual
# "moderate" (0.1) and "major" (0.25) marks; the label mix uses 0.1 because a model's predictions follow its
# inputs only partly, so a shift there is already a strong signal. `rating_tau`: ratings falling over time.
DEFAULT_THRESHOLDS: dict = {
    "alpha": 0.01,
    "auc": 0.6,
    "length_psi": 0.2,
    "vocabulary_psi": 0.2,
    "label_psi": 0.1,
    "rating_tau": -0.1,
}
MAX_TEXTS = 1000  # per side: a seeded sample beyond this (encoding is the cost, linear in the texts)
MIN_TEXTS = 5  # per side, below which no test says anything
MIN_RATINGS = 10
ENCODER = "minilm-l6"
ENCODER_MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128 word pieces; longer inputs are cut there
VOCAB_BINS = 200
LENGTH_BINS = 10
_WORD = re.compile(r"\w+", re.UNICODE)


# ----------------------------------------------------------------------------------------------------
# the encoder

_ENCODERS: dict[str, tuple] = {}
_EMBEDDINGS: dict[tuple[str, str], np.ndarray] = {}  # (encoder dir, sha256 of the text) -> its embedding
_EMBEDDINGS_MAX = 50_000  # a loop re-reads the same training texts every cycle; beyond this, start over


def _encoder(encoder_dir: str | None):
    from .zoo import resolve_model

    path = encoder_dir or resolve_model(ENCODER)
    if path not in _ENCODERS:
        import torch
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        _ENCODERS[path] = (tok, model)
    return path, *_ENCODERS[path]


def embed(texts: list[str], encoder_dir: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Unit-length sentence embeddings (n, 384): mean of the last hidden states over real tokens, as
    sentence-transformers pools all-MiniLM-L6-v2. fp32, so that a verdict does not depend on whether the
    machine has bf16 kernels; texts are batched by length (less padding) and each is encoded once per
    process (a loop reads the same training texts every cycle)."""
    import torch

    path, tok, model = _encoder(encoder_dir)
    keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    unique = dict(zip(keys, texts))
    if len(_EMBEDDINGS) + len(unique) > _EMBEDDINGS_MAX:
        _EMBEDDINGS.clear()
    # similar lengths together: less padding
    todo = sorted(((k, t) for k, t in unique.items() if (path, k) not in _EMBEDDINGS), key=lambda kv: len(kv[1]))
    with torch.inference_mode():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            enc = tok([t for _, t in chunk], padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for (k, _), v in zip(chunk, pooled.float().numpy()):
                _EMBEDDINGS[(path, k)] = v
    return np.stack([_EMBEDDINGS[(path, k)] for k in keys]) if keys else np.zeros((0, 384), np.float32)


# ----------------------------------------------------------------------------------------------------
# the statistics


def psi(expected: np.ndarray, actual: np.ndarray, pseudo: float = 0.5) -> float:
    """Population stability index of two count vectors over the same bins: sum (a - e) ln(a / e) over the
    shares. Each bin gets `pseudo` counts first (Jeffreys), so an empty bin is finite, not infinite."""
    e = np.asarray(expected, float) + pseudo
    a = np.asarray(actual, float) + pseudo
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def _assignments(n_total: int, n_live: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(n_total, permutations) 0/1 matrix: which of the pooled texts each permutation calls live."""
    out = np.zeros((n_total, permutations), np.float32)
    for p in range(permutations):
        out[rng.permutation(n_total)[:n_live], p] = 1.0
    return out


def _p_value(observed: float, null: np.ndarray) -> float:
    # (1 + hits) / (1 + permutations): never 0, and exact for a permutation test
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def _psi_test(rows: np.ndarray, n_ref: int, assign: np.ndarray) -> tuple[float, float]:
    """PSI of live against reference, where each text contributes a row of counts over the bins (one-hot
    for a length bin, word counts for vocabulary), and its permutation p-value: texts, not words, are
    what is exchangeable under no drift, so whole rows are shuffled."""
    total = rows.sum(0)
    live = rows[n_ref:].sum(0)
    observed = psi(total - live, live)
    perm_live = assign.T @ rows  # (permutations, bins)
    null = np.array([psi(total - pl, pl) for pl in perm_live])
    return observed, _p_value(observed, null)


def _mmd_test(x: np.ndarray, n_ref: int, assign: np.ndarray) -> tuple[float, float]:
    """Unbiased MMD² with a Gaussian kernel (bandwidth: the median pairwise squared distance) and its
    permutation p-value. Every permutation's block sums come from one product K @ assignments."""
    x = x.astype(np.float64)
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    iu = np.triu_indices(len(x), 1)
    bw = float(np.median(d2[iu])) or 1.0
    k = np.exp(-d2 / bw)
    np.fill_diagonal(k, 0.0)
    n_total = len(x)
    m, n = n_ref, n_total - n_ref
    rowsum = k.sum(1)
    grand = rowsum.sum()

    def mmd2(live: np.ndarray) -> np.ndarray:  # live: (n_total, P) 0/1
        k_live = k @ live
        s_ll = np.sum(live * k_live, 0)
        s_rl = rowsum @ live - s_ll
        s_rr = grand - 2 * s_rl - s_ll
        return s_rr / (m * (m - 1)) + s_ll / (n * (n - 1)) - 2 * s_rl / (m * n)

    observed_live = np.zeros((n_total, 1))
    observed_live[n_ref:] = 1.0
    observed = float(mmd2(observed_live)[0])
    return observed, _p_value(observed, mmd2(assign.astype(np.float64)))


def _domain_auc(x: np.ndarray, n_ref: int, seed: int) -> tuple[float, np.ndarray]:
    """Cross-validated AUC of a logistic regression telling live (1) from reference (0), and each text's
    out-of-fold score (the report's histogram)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.r_[np.zeros(n_ref), np.ones(len(x) - n_ref)]
    folds = min(5, n_ref, len(x) - n_ref)
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    scores = cross_val_predict(clf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores)), scores


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _length_rows(ref_lens: np.ndarray, all_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-hot rows over bins cut at the reference's deciles (ties merged), and the cut points."""
    edges = np.unique(np.quantile(ref_lens, np.linspace(0, 1, LENGTH_BINS + 1)[1:-1]))
    bins = np.searchsorted(edges, all_lens, side="right")
    rows = np.zeros((len(all_lens), len(edges) + 1), np.float32)
    rows[np.arange(len(all_lens)), bins] = 1.0
    return rows, edges


def _vocab_rows(ref_words: list[list[str]], all_words: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    counts = Counter(w for ws in ref_words for w in ws)
    top = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:VOCAB_BINS]]
    index = {w: i for i, w in enumerate(top)}
    rows = np.zeros((len(all_words), len(top) + 1), np.float32)
    for r, ws in enumerate(all_words):
        for w in ws:
            rows[r, index.get(w, len(top))] += 1
    return rows, top


def _check(value, threshold, drifted: bool, p_value=None, **extra) -> dict:
    out = {"value": None if value is None else round(float(value), 6), "threshold": threshold,
           "drifted": bool(drifted)}
    if p_value is not None:
        out["p_value"] = round(float(p_value), 6)
    out.update(extra)
    return out


def _sample(texts: list[str], cap: int, rng: random.Random) -> list[str]:
    return list(texts) if len(texts) <= cap else rng.sample(list(texts), cap)


def _thresholds(overrides: dict | None) -> dict:
    th = dict(DEFAULT_THRESHOLDS)
    for k, v in (overrides or {}).items():
        if k not in th:
            raise DataError(f"thresholds.{k}: unknown threshold (known: {', '.join(th)})")
        th[k] = v
    return th


# ----------------------------------------------------------------------------------------------------
# the API


def text_drift(reference: list[str], live: list[str], *, encoder_dir: str | None = None, seed: int = 0,
               permutations: int = 200, thresholds: dict | None = None, max_texts: int = MAX_TEXTS) -> dict:
    """Do the live texts differ from the reference texts? `{"score", "drifted", "checks": {embedding, length,
    vocabulary}, "n_reference", "n_live", ...}`; `score` is the domain classifier's AUC (0.5: no drift)."""
    return _text_drift(reference, live, encoder_dir=encoder_dir, seed=seed, permutations=permutations,
                       thresholds=thresholds, max_texts=max_texts)[0]


def _text_drift(reference, live, *, encoder_dir, seed, permutations, thresholds, max_texts) -> tuple[dict, dict]:
    """text_drift, and what the HTML report plots (embeddings, lengths, out-of-fold scores)."""
    th = _thresholds(thresholds)
    if 1 / (1 + permutations) >= th["alpha"]:
        raise DataError(f"permutations: {permutations} cannot give a p-value under alpha {th['alpha']}; "
                        f"use at least {int(np.ceil(1 / th['alpha']))}")
    ref = [t for t in reference if isinstance(t, str) and t.strip()]
    liv = [t for t in live if isinstance(t, str) and t.strip()]
    if len(ref) < MIN_TEXTS or len(liv) < MIN_TEXTS:
        raise DataError(f"drift: need at least {MIN_TEXTS} non-empty texts on each side "
                        f"(reference {len(ref)}, live {len(liv)})")
    rng = random.Random(seed)
    ref, liv = _sample(ref, max_texts, rng), _sample(liv, max_texts, rng)
    texts, n_ref = ref + liv, len(ref)
    nprng = np.random.default_rng(seed)
    assign = _assignments(len(texts), len(liv), permutations, nprng)

    x = embed(texts, encoder_dir)
    auc, scores = _domain_auc(x, n_ref, seed)
    mmd2, p_mmd = _mmd_test(x, n_ref, assign)
    alpha = th["alpha"]
    checks = {"embedding": _check(auc, th["auc"], auc >= th["auc"] and p_mmd < alpha, p_mmd,
                                  mmd2=round(mmd2, 6), alpha=alpha)}

    toks = [words(t) for t in texts]
    lens = np.array([len(w) for w in toks], float)
    rows, edges = _length_rows(lens[:n_ref], lens)
    v, p = _psi_test(rows, n_ref, assign)
    checks["length"] = _check(v, th["length_psi"], v >= th["length_psi"] and p < alpha, p, alpha=alpha,
                              mean_reference=round(float(lens[:n_ref].mean()), 2),
                              mean_live=round(float(lens[n_ref:].mean()), 2))
    rows, top = _vocab_rows(toks[:n_ref], toks)
    v, p = _psi_test(rows, n_ref, assign)
    live_words = rows[n_ref:].sum()
    checks["vocabulary"] = _check(v, th["vocabulary_psi"], v >= th["vocabulary_psi"] and p < alpha, p,
                                  alpha=alpha, other_share_live=round(float(rows[n_ref:, -1].sum() / max(live_words, 1)), 4),
                                  other_share_reference=round(float(rows[:n_ref, -1].sum() / max(rows[:n_ref].sum(), 1)), 4))
    result = {"score": round(auc, 6), "drifted": any(c["drifted"] for c in checks.values()), "checks": checks,
              "n_reference": n_ref, "n_live": len(liv), "n_reference_given": len(reference),
              "n_live_given": len(live), "seed": seed, "permutations": permutations}
    extras = {"embeddings": x, "n_ref": n_ref, "lengths": lens, "domain_scores": scores, "length_edges": edges}
    return result, extras


def label_drift(prior: dict[str, int], predicted: list[str], *, thresholds: dict | None = None) -> dict:
    """Does the predicted label mix differ from the training label prior? `score` is the PSI; the p-value is
    a chi-square goodness-of-fit test of the predicted counts against the prior's shares. A label the
    training data never had counts as its own bin (and is listed)."""
    from scipy.stats import chisquare

    th = _thresholds(thresholds)
    if not prior or sum(prior.values()) <= 0:
        raise DataError("prior: the training label counts are empty")
    if len(predicted) < MIN_TEXTS:
        raise DataError(f"predicted: need at least {MIN_TEXTS} predicted labels, got {len(predicted)}")
    got = Counter(predicted)
    unknown = sorted(set(got) - set(prior))
    labels = sorted(prior) + unknown
    e = np.array([prior.get(lab, 0) for lab in labels], float)
    a = np.array([got.get(lab, 0) for lab in labels], float)
    value = psi(e, a)
    # the prior's shares, smoothed as in the PSI, scaled to the predictions' total (chisquare wants equal sums)
    shares = (e + 0.5) / (e + 0.5).sum()
    p = float(chisquare(a, shares * a.sum()).pvalue) if len(labels) > 1 else 1.0
    alpha = th["alpha"]
    check = _check(value, th["label_psi"], value >= th["label_psi"] and p < alpha, p, alpha=alpha,
                   prior={lab: round(float(x / e.sum()), 4) for lab, x in zip(labels, e)},
                   live={lab: round(float(x / a.sum()), 4) for lab, x in zip(labels, a)},
                   unknown_labels=unknown)
    return {"score": check["value"], "drifted": check["drifted"], "checks": {"labels": check},
            "n_reference": int(e.sum()), "n_live": int(a.sum())}


def rating_drift(ratings: list[tuple[float, float]], *, thresholds: dict | None = None) -> dict:
    """Are ratings falling? Kendall's tau of (time, rating) pairs, same shape as `text_drift`; too few
    ratings give `value: None` and no drift."""
    from scipy.stats import kendalltau

    th = _thresholds(thresholds)
    pts = sorted((float(t), float(r)) for t, r in ratings if r is not None)
    n = len(pts)
    if n < MIN_RATINGS or len({r for _, r in pts}) < 2:
        check = _check(None, th["rating_tau"], False, None, n=n,
                       note=f"fewer than {MIN_RATINGS} ratings, or all the same" if n else "no ratings")
    else:
        res = kendalltau([t for t, _ in pts], [r for _, r in pts])
        tau, p = float(res.statistic), float(res.pvalue)
        half = n // 2
        check = _check(tau, th["rating_tau"], tau <= th["rating_tau"] and p < th["alpha"], p, n=n,
                       alpha=th["alpha"], mean_first_half=round(float(np.mean([r for _, r in pts[:half]])), 3),
                       mean_second_half=round(float(np.mean([r for _, r in pts[half:]])), 3))
    return {"score": check["value"], "drifted": check["drifted"], "checks": {"rating": check},
            "n_reference": 0, "n_live": n}


# ----------------------------------------------------------------------------------------------------
# a served version against its training data

DRIFT_JSON = "drift.json"
DRIFT_HTML = "drift.html"
EXIT_DRIFTED = 4  # `tuneloop drift` exits 0 (no drift) or this (drift); 1-3 are errors (errors.py)


def _prompt_text(prompt) -> str:
    """A logged prompt as the text the model read, the way `Record.input_text` reads a training record:
    a completion prompt as it is, chat turns without the assistant's."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") != "assistant")


def _reference(run) -> tuple[list[str], dict[str, int] | None, str]:
    """The run's training inputs as text, its training label counts (classify), and the file they came from."""
    from .data.commands import RECIPE_READERS

    dc = run.recipe.data
    if run.task not in RECIPE_READERS or not dc.train:
        raise DataError(f"{run.dir}: task {run.task!r} has no training data drift can read")
    path = run.recipe.resolve_path(dc.train)
    res = RECIPE_READERS[run.task](path, dc, "utf-8")
    if not res.records:
        raise DataError(f"{path}: no usable training records (the training data of {run.dir})")
    texts = [r.input_text() for r in res.records]
    prior = dict(Counter(r.label for r in res.records)) if run.task == "classify" else None
    return texts, prior, path


def _target(workspace: Path, ref: str):
    """(the run, the version names the server logged it under, the registered version's ref or None)."""
    from . import registry
    from .runs import open_run

    if registry.is_ref(ref):
        v = registry.resolve(workspace, ref)
        run = open_run(v.run_dir, workspace)
        # served by its registered name (NAME:VERSION), or loaded as a plain run folder (its folder name)
        return run, [v.ref, run.dir.name], v.ref
    run = open_run(ref, workspace)
    return run, [run.dir.name], None


def drift_report(workspace: Path, ref: str, since: float | None = None, out_dir: Path | None = None, *,
                 thresholds: dict | None = None, seed: int = 0, permutations: int = 200,
                 encoder_dir: str | None = None, max_texts: int = MAX_TEXTS) -> dict:
    """The live inputs the server logged for `ref` (NAME:VERSION, NAME@ALIAS or a run folder) since `since`
    (epoch seconds; None: all) against the training data of its run: text drift, the predicted label mix
    (classify) and the rating trend. Writes `drift.json` and `drift.html` to `out_dir` (default
    `<workspace>/drift/<ref>/`) and returns the JSON."""
    from .feedback import FeedbackStore
    from .fileio import write_json_atomic, write_text_atomic

    workspace = Path(workspace)
    th = _thresholds(thresholds)
    run, names, version = _target(workspace, ref)
    reference, prior, ref_path = _reference(run)
    db = workspace / "feedback.db"
    if not db.exists():
        raise DataError(f"{db}: no feedback store: nothing has been served from this workspace yet "
                        f"(`tuneloop serve` logs every request there)")
    store = FeedbackStore(db)
    try:
        rows: dict[str, dict] = {}
        for name in dict.fromkeys(names):
            for r in store.responses(since=since, model_version=name):
                if (r["endpoint"] == "classify") == (run.task == "classify"):
                    rows[r["id"]] = r
        # a rating is placed at the time of the answer it rates: the trend is of the model on that day's
        # traffic, however late the rating came (from /v1/feedback or a reviewer)
        ratings = [(rows[f["response_id"]]["created"], f["rating"]) for f in store.feedback()
                   if f["response_id"] in rows and f["rating"] is not None]
        ratings += [(rows[rv["response_id"]]["created"], rv["rating"]) for rv in store.reviews()
                    if rv.get("response_id") in rows and rv["rating"] is not None]
    finally:
        store.close()
    live_rows = sorted(rows.values(), key=lambda r: (r["created"], r["id"]))
    when = "" if since is None else f" since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(since))} UTC"
    if len(live_rows) < MIN_TEXTS:
        raise DataError(f"{ref}: {len(live_rows)} live inputs logged for {' / '.join(dict.fromkeys(names))}{when} "
                        f"in {db}; drift needs at least {MIN_TEXTS} (serve it and send it traffic, or widen --since)")
    live = [_prompt_text(r["prompt"]) for r in live_rows]
    text, extras = _text_drift(reference, live, encoder_dir=encoder_dir, seed=seed, permutations=permutations,
                               thresholds=th, max_texts=max_texts)
    checks = dict(text["checks"])
    labels = None
    if prior is not None:
        labels = label_drift(prior, [r["output"] for r in live_rows], thresholds=th)
        checks.update(labels["checks"])
    rating = rating_drift(ratings, thresholds=th)
    checks.update(rating["checks"])
    drifted = [k for k, c in checks.items() if c["drifted"]]
    out = {"ref": ref, "version": version, "run": str(run.dir), "task": run.task, "served_as": list(dict.fromkeys(names)),
           "training_data": ref_path, "since": since, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "score": text["score"], "drifted": bool(drifted), "drifted_checks": drifted, "checks": checks,
           "n_reference": text["n_reference"], "n_live": text["n_live"],
           "n_reference_given": text["n_reference_given"], "n_live_given": text["n_live_given"],
           "live_window": [live_rows[0]["created"], live_rows[-1]["created"]],
           "thresholds": th, "seed": seed, "permutations": permutations, "max_texts": max_texts,
           "encoder": ENCODER if encoder_dir is None else str(encoder_dir)}
    out_dir = Path(out_dir) if out_dir is not None else workspace / "drift" / re.sub(r"[^A-Za-z0-9_.-]+", "-", ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / DRIFT_JSON, out)
    write_text_atomic(out_dir / DRIFT_HTML, render_html(out, extras, prior, [r["output"] for r in live_rows],
                                                         sorted(ratings)))
    out["json"], out["html"] = str(out_dir / DRIFT_JSON), str(out_dir / DRIFT_HTML)
    return out


# ----------------------------------------------------------------------------------------------------
# the HTML report


def _png(fig) -> str:
    import base64

    from .plots import figure_png

    return base64.b64encode(figure_png(fig, dpi=100)).decode()


def _plots(extras: dict, prior: dict | None, predicted: list[str], ratings: list[tuple[float, float]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    out = []
    x, n_ref = extras["embeddings"], extras["n_ref"]
    xy = PCA(n_components=2, random_state=0).fit_transform(x)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].scatter(*xy[:n_ref].T, s=6, alpha=0.5, label="training")
    ax[0].scatter(*xy[n_ref:].T, s=6, alpha=0.5, label="live")
    ax[0].set_title("MiniLM embeddings, first two principal components")
    ax[0].legend()
    s = extras["domain_scores"]
    bins = np.linspace(0, 1, 26)
    ax[1].hist(s[:n_ref], bins=bins, alpha=0.6, density=True, label="training")
    ax[1].hist(s[n_ref:], bins=bins, alpha=0.6, density=True, label="live")
    ax[1].set_title("domain classifier: out-of-fold P(live)")
    ax[1].legend()
    fig.tight_layout()
    out.append(("embeddings", _png(fig)))

    lens = extras["lengths"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lo, top = float(lens.min()), max(float(np.percentile(lens, 99)), 1.0)
    # whole words: one bar per length while they fit, else 30 bars (the longest 1% in the last)
    bins = np.arange(lo - 0.5, top + 1.5) if top - lo <= 30 else np.linspace(lo, top, 31)
    ax.hist(np.minimum(lens[:n_ref], top), bins=bins, alpha=0.6, density=True, label="training")
    ax.hist(np.minimum(lens[n_ref:], top), bins=bins, alpha=0.6, density=True, label="live")
    ax.set_xlabel("words per text")
    ax.set_title("text length")
    ax.legend()
    fig.tight_layout()
    out.append(("lengths", _png(fig)))

    if prior is not None:
        got = Counter(predicted)
        labels = sorted(set(prior) | set(got))
        e = np.array([prior.get(lab, 0) for lab in labels], float)
        a = np.array([got.get(lab, 0) for lab in labels], float)
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 3.5))
        pos = np.arange(len(labels))
        ax.bar(pos - 0.2, e / e.sum(), 0.4, label="training labels")
        ax.bar(pos + 0.2, a / a.sum(), 0.4, label="live predictions")
        ax.set_xticks(pos, labels, rotation=30, ha="right")
        ax.set_ylabel("share")
        ax.set_title("label mix")
        ax.legend()
        fig.tight_layout()
        out.append(("label mix", _png(fig)))

    if ratings:
        t = np.array([r[0] for r in ratings]) / 86400
        t = t - t[0]
        v = np.array([r[1] for r in ratings], float)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.scatter(t, v, s=10, alpha=0.5)
        k = max(1, len(v) // 10)
        ax.plot(t[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), color="C1", label=f"mean of {k}")
        ax.set_xlabel("days since the first rating")
        ax.set_ylabel("rating")
        ax.set_title("ratings over time")
        ax.legend()
        fig.tight_layout()
        out.append(("ratings", _png(fig)))
    return out


def render_html(report: dict, extras: dict, prior: dict | None, predicted: list[str],
                ratings: list[tuple[float, float]]) -> str:
    import html

    e = html.escape
    rows = ""
    for name, c in report["checks"].items():
        val = "-" if c["value"] is None else f"{c['value']:.4f}"
        p = f"{c['p_value']:.4f}" if c.get("p_value") is not None else "-"
        rows += (f"<tr class=\"{'bad' if c['drifted'] else ''}\"><td>{e(name)}</td><td>{val}</td><td>{p}</td>"
                 f"<td>{e(str(c['threshold']))}</td><td>{'yes' if c['drifted'] else 'no'}</td></tr>")
    figs = "".join(f'<figure><img alt="{e(n)}" src="data:image/png;base64,{png}"><figcaption>{e(n)}</figcaption>'
                   f"</figure>" for n, png in _plots(extras, prior, predicted, ratings))
    verdict = "drift" if report["drifted"] else "no drift"
    title = f"drift of {report['ref']}: {verdict}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}} table{{border-collapse:collapse;margin:.5rem 0}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}} td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1rem}} .meta{{color:#555}} tr.bad td{{background:#fbe3e1}}
</style></head><body>
<h1>{e(title)}</h1>
<p class="meta">run <code>{e(report['run'])}</code> · training data <code>{e(report['training_data'])}</code>
 ({report['n_reference']} of {report['n_reference_given']} texts read) · live inputs logged as
 <code>{e(', '.join(report['served_as']))}</code> ({report['n_live']} of {report['n_live_given']} read)
 · seed {report['seed']} · {report['permutations']} permutations</p>
<p>score (domain classifier AUC; 0.5 = live inputs look like training): <b>{report['score']:.3f}</b></p>
<table><tr><th>check</th><th>value</th><th>p-value</th><th>threshold</th><th>drifted</th></tr>{rows}</table>
<p class="meta">A check flags drift when its value is past the threshold and its p-value is under
alpha = {report['thresholds']['alpha']}. embedding: AUC, MMD permutation p-value; length, vocabulary,
labels: PSI (permutation / chi-square p-value); rating: Kendall's tau of rating against time.</p>
{figs}
</body></html>
"""
