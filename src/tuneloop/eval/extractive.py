"""Classical extractive summaries, the bar a tuned summariser must clear: `lead` (the document's first
sentences) and `textrank` (the most central sentences: PageRank over the sentences' TF-IDF cosine
similarity graph, Mihalcea & Tarau 2004 with LexRank's cosine edges).

networkx computes PageRank and scikit-learn the TF-IDF vectors; both are already dependencies. The
packaged TextRank implementations (sumy, pytextrank) need NLTK or spaCy models that are downloaded at run
time, which cannot work offline, so the 20 lines of graph building are written here.
"""

from __future__ import annotations

import re

SYSTEMS = ("lead", "textrank")

# A sentence ends at . ! ? (and a closing quote or bracket) followed by space and a capital, a digit or an
# opening bracket; "e.g. the" and "Fig. 3" stay whole often enough for summaries of a sentence or two.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9(\[])")
_ABBREVIATIONS = re.compile(r"\b(?:e\.g|i\.e|et al|Fig|Eq|vs|cf|Sec|No)\.$")


def document_of(user_turn: str) -> str:
    """The text to summarise in a user turn: where the turn is a document and an instruction separated by a
    blank line, the longest block (the part `data.answer_room` cuts, infer.encode.fit_prompt)."""
    from ..infer.encode import longest_block

    start, end = longest_block(user_turn)
    return user_turn[start:end].strip()


def sentences(text: str) -> list[str]:
    parts, out = _SENTENCE_END.split(text.replace("\n", " ")), []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if out and _ABBREVIATIONS.search(out[-1]):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out


def lead(text: str, n: int = 1) -> str:
    return " ".join(sentences(text)[:n])


def textrank(text: str, n: int = 1, damping: float = 0.85) -> str:
    """The `n` highest-ranked sentences, in document order."""
    import networkx as nx
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    sents = sentences(text)
    if len(sents) <= n:
        return " ".join(sents)
    try:
        vectors = TfidfVectorizer(stop_words="english").fit_transform(sents)
    except ValueError:  # nothing but stop words
        return lead(text, n)
    sim = cosine_similarity(vectors)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(sents)))
    graph.add_weighted_edges_from((i, j, float(sim[i, j])) for i in range(len(sents))
                                  for j in range(i + 1, len(sents)) if sim[i, j] > 0)
    rank = nx.pagerank(graph, alpha=damping, weight="weight")
    top = sorted(sorted(rank, key=lambda i: (-rank[i], i))[:n])
    return " ".join(sents[i] for i in top)


def summarise(system: str, user_turn: str, n: int = 1) -> str:
    if system not in SYSTEMS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown extractive system {system!r} (known: {', '.join(SYSTEMS)})")
    doc = document_of(user_turn)
    return lead(doc, n) if system == "lead" else textrank(doc, n)
