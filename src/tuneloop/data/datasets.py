"""Real data sets that ship inside installed packages but not as one ready table: `dataset:NAME/SPLIT`.

Each entry turns the package's own files into the rows a recipe reads (offline, read straight from
site-packages), so a recipe names the data set and no preprocessing step stands between the user and the
run. A registry of plain data: an unknown name fails with the known ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DataError, NotFoundError
from ..zoo import package_dir

from .formats import DATASET_PREFIX

# ACLSum (Takeshita et al., NAACL 2024): 250 ACL papers, each with a one-sentence expert summary of three
# aspects. The package's reader needs `sienna`, which is not on the index, so its JSONL is read directly.
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")
ACLSUM_SPLITS = ("train", "val", "test")
# The document first, the instruction last: a small model follows the line it read last, and a cut in the
# document's middle (data.truncate: middle) keeps the abstract and the conclusion.
ACLSUM_PROMPT = "{document}\n\nIn one sentence, what is the {aspect} of this paper?"
ACLSUM_ASPECT_WORDS = {"challenge": "challenge (the problem it addresses)",
                       "approach": "approach (what the authors do)",
                       "outcome": "outcome (what they found)"}


def _aclsum(split: str) -> Iterator[tuple[int, dict]]:
    if split not in ACLSUM_SPLITS:
        raise DataError(f"dataset:aclsum/{split}: unknown split (known: {', '.join(ACLSUM_SPLITS)})")
    # Located, not imported: the package's __init__ imports `sienna`, which is not on the index (see the
    # Makefile), and only its data files are read.
    pkg = package_dir("aclsum")
    if pkg is None:
        raise NotFoundError("dataset:aclsum: the `aclsum` package is not installed (make setup installs it)")
    root = pkg / "dataset"
    path = root / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            paper = json.loads(line)
            document = " ".join(s for sec in ACLSUM_SECTIONS for s in paper["sentences"][sec])
            document = f"{paper['title']}\n\n{document}"
            for aspect in ACLSUM_ASPECTS:
                yield line_no, {"messages": [
                    {"role": "user", "content": ACLSUM_PROMPT.format(document=document,
                                                                     aspect=ACLSUM_ASPECT_WORDS[aspect])},
                    {"role": "assistant", "content": paper["summary"][aspect]}],
                    "paper": paper["id"], "aspect": aspect}


DATASETS: dict[str, Callable[[str], Iterator[tuple[int, dict]]]] = {"aclsum": _aclsum}


def read_dataset(spec: str) -> Iterator[tuple[int, dict]]:
    """(line of the package's own file, row) for `dataset:NAME/SPLIT`."""
    name, _, split = spec[len(DATASET_PREFIX):].partition("/")
    if name not in DATASETS:
        raise NotFoundError(f"{spec}: unknown data set {name!r} (known: {', '.join(sorted(DATASETS))})")
    if not split:
        raise DataError(f"{spec}: expected dataset:{name}/SPLIT")
    yield from DATASETS[name](split)
