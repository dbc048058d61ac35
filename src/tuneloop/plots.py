"""Figures as PNG bytes, for the HTML reports (embedded as base64) and the run folder's loss plot."""

from __future__ import annotations

import io


def figure_png(fig, **savefig) -> bytes:
    """The figure rendered as PNG, then closed (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    plt.close(fig)
    return buf.getvalue()
