"""Where benchmark numbers go: the latest run as JSON, and a Markdown table that keeps every run."""

from __future__ import annotations

import json
import platform
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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with its family and model numbers (a VM may show a bare name)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def code(text: str) -> str:
    """A Markdown code span that survives backticks inside ``text``."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"
