"""The group-assignment report: groups.csv, groups.json, similarity.png, report.html
(and, inside a run, assignment.json). Every file is written atomically."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PapmError
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .grouping import GroupingAnalysis
from .plots import figure_png, pyplot

REPORT_FILES = ("groups.csv", "groups.json", "similarity.png", "report.html")


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _num(x: float):
    return None if isinstance(x, float) and math.isnan(x) else round(float(x), 6)


def groups_text(names: list[list[str]]) -> str:
    return " | ".join(", ".join(g) for g in names)  # class names may hold spaces


def leaf_order(similarity: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Dendrogram (average linkage on 1 - similarity, as the clustering) and its leaf order."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    dist = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    link = linkage(squareform((dist + dist.T) / 2.0, checks=False), method="average")
    return [int(i) for i in leaves_list(link)], link


def similarity_png(analysis: GroupingAnalysis, chosen_k: int | None = None) -> bytes:
    """Heatmap ordered by the clustering, with the dendrogram above it."""
    plt = pyplot()
    from scipy.cluster.hierarchy import dendrogram

    order, link = leaf_order(analysis.similarity)
    names = [analysis.class_names[i] for i in order]
    c = len(names)
    side = min(14.0, max(5.0, 0.45 * c + 3.0))
    fig = plt.figure(figsize=(side, side * 1.2))
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 4], width_ratios=[20, 1], hspace=0.02, wspace=0.05)
    ax_d = fig.add_subplot(gs[0, 0])
    dendrogram(link, ax=ax_d, no_labels=True, color_threshold=0, above_threshold_color="#555555")
    ax_d.set_axis_off()
    title = f"class similarity ({analysis.similarity_kind} of class-mean {analysis.outputs})"
    if chosen_k:
        title += f" - K={chosen_k}: " + groups_text(analysis.group_names(chosen_k))
    ax_d.set_title(title, fontsize=10, wrap=True)
    ax = fig.add_subplot(gs[1, 0])
    sim = analysis.similarity[np.ix_(order, order)]
    # Colour only the off-diagonal range: the diagonal is 1 by definition and would
    # otherwise flatten the differences between classes into one colour.
    off = sim[~np.eye(c, dtype=bool)]
    vmin, vmax = float(off.min()), float(off.max())
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    shown = np.ma.masked_where(np.eye(c, dtype=bool), sim)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(c), names, rotation=90 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    ax.set_yticks(range(c), names, fontsize=8)
    if c <= 20:
        mid = (vmin + vmax) / 2
        digits = 3 if vmax - vmin < 0.1 else 2  # narrow ranges need the third decimal to differ
        for i in range(c):
            for j in range(c):
                if i != j:
                    ax.text(j, i, f"{sim[i, j]:.{digits}f}", ha="center", va="center", fontsize=7,
                            color="black" if sim[i, j] > mid else "white")
    if chosen_k:
        # every class name takes its group's colour (balanced groups need not be contiguous in the
        # dendrogram order); groups that are contiguous are also outlined in that colour
        palette = plt.get_cmap("tab10" if chosen_k <= 10 else "tab20")
        colour = {cls: palette(g % palette.N) for g, members in enumerate(analysis.partitions[chosen_k]) for cls in members}
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            for p, label in enumerate(labels):
                label.set_color(colour[order[p]])
                label.set_fontweight("bold")
        pos = {cls: p for p, cls in enumerate(order)}
        for g, members in enumerate(analysis.partitions[chosen_k]):
            ps = sorted(pos[cls] for cls in members)
            if ps[-1] - ps[0] + 1 == len(ps):
                ax.add_patch(plt.Rectangle((ps[0] - 0.5, ps[0] - 0.5), len(ps), len(ps), fill=False,
                                           ec=palette(g % palette.N), lw=2.5))
        ax.set_xlabel(f"class names coloured by their group at K={chosen_k}", fontsize=8)
    bar = fig.colorbar(im, cax=fig.add_subplot(gs[1, 1]))
    bar.set_label("similarity (diagonal = 1, not coloured)")
    return figure_png(fig, tight_layout=False, bbox_inches="tight")


def rows_per_k(analysis: GroupingAnalysis) -> list[dict[str, Any]]:
    rows = []
    for k, groups in analysis.partitions.items():
        rows.append({
            "k": k,
            "groups": groups_text(analysis.group_names(k)),
            "sizes": ",".join(str(len(g)) for g in groups),
            "mean_within_similarity": _fmt(analysis.mean_within[k]),
            "confusion_within": _fmt(analysis.confusion_share[k]),
        })
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _html_page(analysis: GroupingAnalysis, png: bytes, run: dict | None) -> str:
    esc = html.escape
    chosen = run.get("chosen_k") if run else None
    rows = rows_per_k(analysis)
    trs = "\n".join(
        f"<tr{' class=chosen' if r['k'] == chosen else ''}><td>{r['k']}</td><td>"
        + "".join(f"<span class=g>{esc(', '.join(g))}</span>" for g in analysis.group_names(r["k"]))
        + f"</td><td>{r['sizes']}</td><td>{r['mean_within_similarity']}</td><td>{r['confusion_within']}</td></tr>"
        for r in rows
    )
    run_html = ""
    if run:
        groups = analysis.group_names(chosen)
        items = "".join(f"<li><b>group {g}</b>: {esc(', '.join(names))}</li>" for g, names in enumerate(groups))
        title = f"Chosen: K = {chosen}" if run.get("outside_run") else f"This run: K = {chosen}"
        run_html = f"<h2>{title}</h2><ul>{items}</ul>"
        nodes = run.get("nodes") or []
        if nodes:
            head = "".join(f"<th>{esc(n)}</th>" for n in analysis.class_names)
            body = ""
            for node in nodes:
                counts = node.get("class_counts") or [0] * analysis.num_classes
                total = max(1, sum(counts))
                cells = "".join(
                    f"<td style='background:rgba(31,119,180,{min(1.0, 3 * n / total):.2f})'>{n}</td>" for n in counts
                )
                body += (f"<tr><td>{esc(str(node['node']))}</td><td>{node['group']}</td>"
                         f"<td>{esc(', '.join(groups[node['group']]))}</td>{cells}</tr>")
            run_html += ("<h3>Which node serves which group (training samples per class on each node)</h3>"
                         f"<table><tr><th>node (partition-id)</th><th>group</th><th>classes</th>{head}</tr>{body}</table>")
    meta = (f"{analysis.num_classes} classes; similarity: {esc(analysis.similarity_kind)} of class-mean "
            f"{esc(analysis.outputs)}; {'balanced groups (sizes differ by at most one)' if analysis.balanced else 'unbalanced (plain average linkage)'}")
    classes = ", ".join(f"{i}: {esc(n)}" for i, n in enumerate(analysis.class_names))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PAPM-FL class groups</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f2f2f2; }}
tr.chosen {{ background: #fff3c4; font-weight: bold; }}
span.g {{ display: inline-block; border: 1px solid #888; border-radius: 4px; padding: 1px 6px; margin: 1px 4px 1px 0; background: #f7f7ff; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Class groups for edge devices</h1>
<p>{meta}</p>
<p>Classes: {classes}</p>
{run_html}
<h2>Groups for every K</h2>
<p><i>mean within</i>: mean similarity of classes that share a group (higher = tighter groups).
<i>confusions kept</i>: share of the base model's mistakes that stay inside one group.</p>
<table><tr><th>K</th><th>groups</th><th>sizes</th><th>mean within</th><th>confusions kept</th></tr>
{trs}
</table>
<h2>Similarity</h2>
<img alt="class similarity heatmap with dendrogram" src="data:image/png;base64,{base64.b64encode(png).decode()}">
</body></html>
"""


def write_group_report(out_dir: Path | str, analysis: GroupingAnalysis, run: dict | None = None,
                       chosen_k: int | None = None) -> dict[str, Path]:
    """Write the report files into ``out_dir``.

    ``run`` (inside a run): ``{"chosen_k": K, "nodes": [{"node": id, "group": g,
    "class_counts": [...]}, ...]}``; adds the run section to the page and writes
    ``assignment.json`` (node -> group, group -> classes). ``chosen_k`` outside a run
    (``papm groups --k``): that K is highlighted; no assignment exists.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PapmError(f"{out} is a file, not a folder; give --out a folder for the report files")
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_per_k(analysis)
    chosen = run.get("chosen_k") if run else chosen_k
    png = similarity_png(analysis, chosen)
    run_or_k = run if run else ({"chosen_k": chosen, "outside_run": True} if chosen else None)
    order, link = leaf_order(analysis.similarity)
    doc = {
        "classes": analysis.class_names,
        "similarity_kind": analysis.similarity_kind,
        "outputs": analysis.outputs,
        "similarity": [[round(float(v), 6) for v in row] for row in analysis.similarity],
        "balanced": analysis.balanced,
        "partitions": {str(k): g for k, g in analysis.partitions.items()},
        "mean_within_similarity": {str(k): _num(v) for k, v in analysis.mean_within.items()},
        "confusion_within": {str(k): _num(v) for k, v in analysis.confusion_share.items()},
        "class_counts": [int(v) for v in analysis.counts],
        "confusion": [[int(v) for v in row] for row in analysis.confusion],
        "leaf_order": order,
        "linkage": [[float(v) for v in row] for row in link],
        **analysis.extra,
    }
    if chosen:
        doc["chosen_k"] = chosen
    paths = {
        "groups.csv": atomic_write_text(out / "groups.csv", _csv_text(rows)),
        "groups.json": atomic_write_json(out / "groups.json", doc),
        "similarity.png": atomic_write_bytes(out / "similarity.png", png),
        "report.html": atomic_write_text(out / "report.html", _html_page(analysis, png, run_or_k)),
    }
    if run:
        paths["assignment.json"] = write_assignment(out, analysis.partitions[chosen], analysis.class_names, run.get("nodes", []))
    return paths


def write_assignment(out_dir: Path | str, groups: list[list[int]], class_names: list[str], nodes: list[dict],
                     how: str = "similarity") -> Path:
    """``assignment.json``: group -> classes, node -> group (``how`` the groups were made)."""
    assignment = {
        "k": len(groups),
        "grouping": how,
        "groups": {str(g): {"classes": cls, "class_names": [class_names[c] for c in cls]} for g, cls in enumerate(groups)},
        "nodes": {str(n["node"]): {"group": n["group"], **({"partition_id": n["partition_id"]} if "partition_id" in n else {})}
                  for n in nodes},
    }
    return atomic_write_json(Path(out_dir) / "assignment.json", assignment)


def terminal_table(analysis: GroupingAnalysis, max_k: int | None = None) -> str:
    width = len(str(analysis.num_classes))
    w = max(width, 2)
    lines = [f"{'K':>{w}}  {'within':>7}  {'kept':>6}  groups"]
    for r in rows_per_k(analysis):
        if max_k and r["k"] > max_k:
            lines.append(f"... ({analysis.num_classes - max_k} more K in groups.csv)")
            break
        lines.append(f"{r['k']:>{w}}  {r['mean_within_similarity'] or '-':>7}  {r['confusion_within'] or '-':>6}  {r['groups']}")
    return "\n".join(lines)
