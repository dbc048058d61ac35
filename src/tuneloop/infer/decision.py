"""A classify run's decision rule (`decision.json`, fitted on its validation split by train/balance.py):
per-class offsets added to the log-probabilities before the argmax. `predict_classifier` applies it, so
`tuneloop eval`, the gate (which reads eval's report) and `/v1/classify` predict the same labels."""

from __future__ import annotations

import torch


def offsets_for(decision: dict | None, labels: list[str]) -> list[float] | None:
    """The offsets in the head's label order, or None for plain argmax. A decision for other labels than
    the run's head is an error (a hand-edited or copied file), never silently ignored."""
    if not decision:
        return None
    from ..errors import ConfigError

    offsets = decision.get("offsets") or {}
    if sorted(offsets) != sorted(labels):
        raise ConfigError(f"decision.json: offsets for {', '.join(sorted(offsets))}, but the run's labels are "
                          f"{', '.join(labels)}")
    return [float(offsets[l]) for l in labels]


def apply_offsets(probs: torch.Tensor, offsets: list[float] | None) -> torch.Tensor:
    """softmax(log p + offsets) row by row: the probabilities under the decision rule, whose argmax is the
    rule's label (the same as adding the offsets to the logits)."""
    if offsets is None:
        return probs
    off = torch.tensor(offsets, dtype=torch.float32)
    return (probs.float().clamp_min(torch.finfo(torch.float32).tiny).log() + off).softmax(-1)
