"""Phase 4, export: on the devices, each group's extractor to ONNX (and INT8 with ``int8=true``,
calibrated on the exporting node's own training images), checked against PyTorch there on
local images.

One node per group exports (the first live one); the unsplit base model, kept in the bundle
for comparison, goes to a spare node when there is one. Before the server keeps a file it
checks it itself, on held-out test inputs (a check, nothing is fitted): fp32 against its own
copy of the model, INT8 against that fp32 graph. An item that fails (on the node or in that
check) goes to the next node of its group; a group whose nodes all failed stops the run.
Outputs: ``devices/device-k/extractor[.int8].onnx``, ``base[.int8].onnx``, ``devices/extractors.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ...client.records import record_bytes, state_record
from ...export.onnx_export import feature_graph, int8_check, parity, parity_inputs
from ...shared.datasets import normalise
from ...shared.errors import PapmError
from ...shared.files import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from ..driver import RunDriver


@dataclass
class Item:
    """One file set to export: a group's extractor (``group`` set) or the base model."""

    model: nn.Module
    args: dict
    graph: str  # "features" (a part) or "logits" (the unsplit base model)
    classes: list[int]  # calibration classes: the group's, or all (empty) for the base model
    group: int | None
    stem: Path  # destination without suffix
    tried: set[int] = field(default_factory=set)  # node ids that had it


def accept(d: RunDriver, name: str, item: Item, files: dict[str, bytes], report: dict, x_check, x_real) -> dict:
    """Check the node's files against the server's own model, then move them into place."""
    if "error" in report:
        raise PapmError(report["error"])
    stem = item.stem
    fp32, int8 = stem.with_suffix(".onnx"), stem.with_name(stem.name + ".int8.onnx")
    incoming = {p: stem.with_name(f".{stem.name}.incoming.{p}.onnx") for p in ("fp32", "int8") if f"{name}.{p}" in files}
    if "fp32" not in incoming or (d.cfg.int8 and "int8" not in incoming):
        raise PapmError(f"the reply lacks {name}'s {'INT8' if 'fp32' in incoming else 'fp32'} file")
    try:
        for p, path in incoming.items():
            atomic_write(path, lambda t, b=files[f"{name}.{p}"]: Path(t).write_bytes(b))
        check = parity(feature_graph(item.model) if item.graph == "features" else item.model, incoming["fp32"], x_check)
        if not check["ok"]:
            raise PapmError(f"its ONNX differs from the server's model by {check['max_abs_diff']:.3g}")
        entry = {"file": str(fp32.relative_to(d.rd.path)), "node_report": report,
                 "server_max_abs_diff": check["max_abs_diff"], "tolerance": check["tolerance"],
                 "feature_dim" if item.graph == "features" else "num_classes": int(check["output_shape"][0])}
        if "int8" in incoming:
            q = int8_check(incoming["fp32"], incoming["int8"], x_real)
            if not q["ok"]:
                raise PapmError(f"its INT8 graph is off by {q['rel_error']:.3g} relative to fp32")
            entry.update(int8_file=str(int8.relative_to(d.rd.path)), int8_rel_error=q["rel_error"])
        os.replace(incoming["fp32"], fp32)
        if "int8" in incoming:
            os.replace(incoming["int8"], int8)
    finally:
        for path in incoming.values():
            path.unlink(missing_ok=True)
    d.rd.log_metrics("export", model=name, partition_id=report["partition_id"], max_abs_diff=report["max_abs_diff"],
                     server_max_abs_diff=check["max_abs_diff"], int8_rel_error=entry.get("int8_rel_error"))
    return entry


def plan_round(d: RunDriver, todo: dict[str, Item], assignment: dict) -> dict[int, list[str]]:
    """Node id -> the items it exports this round: each extractor to its group's first untried node,
    the base model to a spare node (one with no extractor this round) when there is one."""
    members = d.group_nodes(assignment)
    plan: dict[int, list[str]] = {}
    for name, item in todo.items():
        if item.group is None:
            continue
        free = [n for n in sorted(members[item.group], key=lambda n: d.nodes[n]["partition_id"]) if n not in item.tried]
        if not free:
            raise PapmError(f"no node of device group {item.group} could export its extractor ({len(item.tried)} tried); "
                            "see the failures in state.json, fix the nodes and continue with --resume")
        plan.setdefault(free[0], []).append(name)
    if "base" in todo:
        untried = [n for n in d.nodes if n not in todo["base"].tried]
        spare = [n for n in untried if n not in plan]
        pick = spare[0] if spare else (untried[0] if untried else None)
        if pick is None:
            raise PapmError("no node could export the base model; fix the nodes and continue with --resume")
        plan.setdefault(pick, []).append("base")
    return plan


def run(d: RunDriver) -> None:
    d.rd.rewind_metrics({"export": None})
    base, info, base_args = d.rd.load_base()
    assignment = d.rd.load_assignment()
    groups = assignment["groups"]
    x_check = parity_inputs(d.test_split().x, n=64, seed=d.cfg.seed, normalise=lambda x: normalise(x, info))
    # INT8 is judged on real images only: its ranges were calibrated on images, noise saturates them
    x_real = x_check[:-8] if len(x_check) > 8 else x_check
    todo: dict[str, Item] = {}
    for g in range(len(groups)):
        model, args = d.rd.load_extractor(g)
        todo[f"device-{g}"] = Item(model, args, "features", groups[g], g, d.rd.device_dir(g) / "extractor")
    todo["base"] = Item(base, base_args, "logits", [], None, d.rd.path / "base")
    done: dict[str, dict] = {}
    while todo:
        plan = plan_round(d, todo, assignment)
        requests = {}
        for n, names in plan.items():
            papm, arrays = {"data-info": info.to_dict(), "items": []}, {}
            for name in names:
                item, key = todo[name], name.replace("-", "_")
                papm[f"{key}-args"] = item.args
                # calibration classes per item: the group's for an extractor, all for the base model
                papm["items"].append({"key": key, "graph": item.graph, "name": name, "classes": item.classes})
                arrays[key] = state_record(item.model.state_dict())
                item.tried.add(n)
            requests[n] = d.content(papm, **arrays)
        replies = d.send("export", "query.export", requests)
        for n, content in replies.items():
            try:
                files = record_bytes(content["files"])
                reports = {k: json.loads(v) for k, v in content["reports"].items()}
            except (KeyError, ValueError) as e:  # a malformed reply: that node's items go elsewhere
                for name in plan[n]:
                    d.item_failed("export", n, name, f"malformed reply ({type(e).__name__}: {e}); server and client versions differ?")
                continue
            for name in plan[n]:
                try:
                    done[name] = accept(d, name, todo[name], files, reports.get(name, {"error": "no report for this item"}),
                                        x_check, x_real)
                    todo.pop(name)
                except Exception as e:  # noqa: BLE001 - a bad file (or ONNX Runtime refusing it) fails the item only
                    d.item_failed("export", n, name, str(e) if isinstance(e, PapmError) else f"{type(e).__name__}: {e}")
    parts = [{"device": g, **done[f"device-{g}"]} for g in range(len(groups))]
    atomic_write_json(d.rd.path / "devices" / "extractors.json", {"parts": parts, "base": done["base"], "int8": d.cfg.int8})
