"""Pictures as PNG bytes (written atomically by the caller): matplotlib without a display."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend; imported only where a picture is drawn (edge installs lack it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 110, tight_layout: bool = True, **savefig) -> bytes:
    """The figure as PNG bytes; the figure is closed (a long suite draws many)."""
    if tight_layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **savefig)
    pyplot().close(fig)
    return buf.getvalue()
