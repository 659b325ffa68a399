"""Where benchmark numbers go: the latest run as JSON, and a Markdown table that keeps every run."""

from __future__ import annotations

import json
from pathlib import Path

from papm.shared.files import atomic_write_text


def record(out_dir: str | Path, name: str, row: dict, columns: dict[str, str]) -> tuple[Path, Path]:
    """Write ``<name>.json`` (this run) and add a row to ``<name>.md`` (all runs), both atomically.

    ``columns`` maps a table header to the key of ``row`` shown under it.
    """
    out = Path(out_dir)
    js = atomic_write_text(out / f"{name}.json", json.dumps(row, indent=2) + "\n")
    md = out / f"{name}.md"
    table = md.read_text() if md.exists() else "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    table += "| " + " | ".join(str(row.get(key, "")) for key in columns.values()) + " |\n"
    atomic_write_text(md, table)
    return js, md
