"""What the prune phase leaves in each device folder: ``pruned.pt``, ``prune.json`` and ``prune_steps.csv``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ....shared.checkpoint import save_checkpoint
from ....shared.compression import dense_runtime_note, size_report
from ....shared.files import atomic_write_csv, atomic_write_json
from ....shared.pruning import macs_and_params
from .cut import cuts, target_budget
from .group_jobs import test_accuracy

if TYPE_CHECKING:
    from ...driver import RunDriver


def write_steps(path, metrics: list[dict], g: int, final: dict) -> None:
    """One row per cut of device ``g``'s model: parameters, reduction and test accuracy after the cut, after the
    recovery before the next cut (or, after the last cut, after BatchNorm re-estimation alone), and (last row) after
    fine-tuning and weight rounding."""
    recovered = {m["round"]: m for m in metrics if m["phase"] == "prune-recovery" and m.get("device") == g}
    bn = {m["round"]: m for m in metrics if m["phase"] == "prune-bn" and m.get("device") == g}
    rows = []
    for m in (m for m in metrics if m["phase"] == "prune" and m.get("device") == g):
        row = {"step": m["round"], "params": m.get("params_after"), "nonzero_params": m.get("nonzero_params", m.get("params_after")),
               "reduction": m.get("reduction"), "after_cut_group": m.get("test_group"), "after_cut_all": m.get("test_all")}
        r, b = recovered.get(m["round"], {}), bn.get(m["round"], {})
        row.update(after_bn_group=b.get("test_group"), after_bn_all=b.get("test_all"),
                   after_recovery_group=r.get("test_group"), after_recovery_all=r.get("test_all"))
        rows.append(row)
    if rows:
        rows[-1].update(final_group=final["test_group"], final_all=final["test_all"])
        atomic_write_csv(path, rows)


def last_cut_accuracy(metrics: list[dict], label: str, g: int) -> dict | None:
    """{"all", "group"} test accuracy of device ``g``'s last ``label`` line (None: no such line)."""
    m = next((m for m in reversed(metrics) if m["phase"] == label and m.get("device") == g), None)
    return None if m is None else {"all": m.get("test_all"), "group": m.get("test_group")}


def round_accuracy(metrics: list[dict], g: int) -> list[dict]:
    """Device ``g``'s test accuracy after each fine-tuning round (before the final BatchNorm re-estimation)."""
    return [{"round": m["round"], "all": m.get("test_all"), "group": m.get("test_group")}
            for m in metrics if m["phase"] == "finetune-test" and m.get("device") == g]


def write_outputs(d: RunDriver, models: dict, args: dict, base, info, groups: list, apoz_nodes: dict,
                  weights: dict) -> None:
    cfg = d.cfg
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    macs_before, params_before = macs_and_params(base.cpu(), example)
    metrics = d.rd.metrics()
    for g, model in models.items():
        out = d.rd.device_dir(g)
        final = test_accuracy(d, model, info, groups[g])
        write_steps(out / "prune_steps.csv", metrics, g, final)
        path = save_checkpoint(out / "pruned.pt", model, args[g], info, kind="pruned", meta={"classes": groups[g], "device": g})
        macs_after, params_after = macs_and_params(model, example)
        atomic_write_json(out / "prune.json", {
            "device": g, "classes": groups[g], "class_names": [info.class_names[c] for c in groups[g]],
            "params_before": params_before, "params_after": params_after,
            # the last cut's: 1 - parameters (sparse: non-zero weights, before any rounding) / the base's
            "reduction": next((m["reduction"] for m in reversed(metrics) if m["phase"] == "prune" and m.get("device") == g),
                              round(1 - params_after / params_before, 6)),
            "target": None if target_budget(cfg) is None else round(target_budget(cfg), 6),
            "schedule": cfg.schedule, "cuts": cuts(cfg), "data_free": cfg.data_free, "level": cfg.level,
            "bn_recalibrate": cfg.bn_recalibrate and not cfg.data_free, **cfg.compression(),
            "weights": weights.get(g, {"weight_bits": 32}), "size": size_report(model),
            "dense_runtime_note": dense_runtime_note(cfg.compression()["sparsity"], cfg.compression()["weight_bits"]),
            "criterion": cfg.criterion if cfg.compression()["sparsity"] == "none" and target_budget(cfg) is not None else None,
            "baseline": cfg.baseline, "grouping": cfg.grouping,
            "alpha": cfg.alpha, "kept_channels": args[g]["channels"], "macs_before": macs_before, "macs_after": macs_after,
            "bytes": path.stat().st_size,
            "test_accuracy": {"all": final["test_all"], "group": final["test_group"]},
            # the last cut's accuracy before any fine-tuning: as cut, and with BatchNorm re-estimated (bn-recalibrate)
            "test_accuracy_after_cut": last_cut_accuracy(metrics, "prune", g),
            "test_accuracy_after_bn_recalibrate": last_cut_accuracy(metrics, "prune-bn", g),
            "test_accuracy_per_round": round_accuracy(metrics, g),
            "apoz_nodes": apoz_nodes[g],
        })
