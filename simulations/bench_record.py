"""Where benchmark numbers go: the latest run as JSON, and a Markdown table that keeps every run."""

from __future__ import annotations

import json
from pathlib import Path


def record(out_dir: str | Path, name: str, row: dict, columns: dict[str, str]) -> tuple[Path, Path]:
    """Write ``<name>.json`` (this run) and append a row to ``<name>.md`` (all runs).

    ``columns`` maps a table header to the key of ``row`` shown under it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    js.write_text(json.dumps(row, indent=2) + "\n")
    md = out / f"{name}.md"
    if not md.exists():
        md.write_text("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    with md.open("a") as f:
        f.write("| " + " | ".join(str(row.get(key, "")) for key in columns.values()) + " |\n")
    return js, md
