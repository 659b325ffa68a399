"""Phase 6, evaluation: the base model and the split model side by side, server-side on the
held-out test split and federated on the nodes' local evaluation splits (counts, so they add
up). Outputs: ``evaluation.json``, ``summary.md``, ``summary.csv``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ...client.records import state_record
from ...shared.checkpoint import load_head
from ...shared.files import atomic_write_json
from ...shared.fusion import SplitModel
from ...shared.models import count_params
from ...shared.training import evaluate
from ..summary import write_summary

if TYPE_CHECKING:
    from ..driver import RunDriver


def run(d: RunDriver) -> None:
    d.rd.rewind_metrics({"evaluation": None})
    base, info, base_args = d.rd.load_base()
    k = d.rd.load_assignment()["k"]
    loaded = [d.rd.load_extractor(g) for g in range(k)]
    extractors = [m for m, _ in loaded]
    head, _, hckpt = load_head(d.rd.path / "fusion" / "head.pt")
    split = SplitModel(extractors, head)
    test = d.test_split()
    base_eval = evaluate(base, test, info, d.device)
    fusion_eval = evaluate(split, test, info, d.device)
    papm, arrays = d.extractors_payload(loaded)
    papm.update({"data-info": info.to_dict(), "head-args": hckpt["head_args"]})
    arrays["head"] = state_record(head.state_dict())
    p, a = d.model_payload(base, base_args)
    papm.update(p)
    arrays.update(a)
    replies = d.send("evaluation", "evaluate", {n: d.content(papm, **arrays) for n in d.nodes})
    n = sum(int(c["metrics"]["num-examples"]) for c in replies.values())
    federated = {
        "nodes": len(replies), "samples": n,
        "base_accuracy": sum(int(c["metrics"]["base-correct"]) for c in replies.values()) / n if n else float("nan"),
        "fusion_accuracy": sum(int(c["metrics"]["fusion-correct"]) for c in replies.values()) / n if n else float("nan"),
    }
    state = d.rd.state()
    evaluation = {
        "test_samples": len(test),
        "base": {"accuracy": base_eval["accuracy"], "params": count_params(base),
                 "per_class": {info.class_names[c]: a for c, a in base_eval["per_class"].items()},
                 "confusion": base_eval["confusion"]},
        "fusion": {"accuracy": fusion_eval["accuracy"], "head": hckpt["meta"].get("fit", "fedavg"),
                   "params": sum(count_params(e) for e in extractors) + count_params(head),
                   "per_class": {info.class_names[c]: a for c, a in fusion_eval["per_class"].items()},
                   "confusion": fusion_eval["confusion"]},
        "federated": federated,
        "devices": [json.loads((d.rd.device_dir(g) / "prune.json").read_text()) for g in range(k)],
        "failures": d.failures + [f for f in state.get("failures", []) if f not in d.failures],
        "stops": state.get("stops", []),
    }
    atomic_write_json(d.rd.path / "evaluation.json", evaluation)
    write_summary(d.rd.path, d.cfg, info, evaluation, d.rd.metrics())
    d.rd.log_metrics("evaluation", base_accuracy=base_eval["accuracy"], fusion_accuracy=fusion_eval["accuracy"],
                     federated_base_accuracy=federated["base_accuracy"], federated_fusion_accuracy=federated["fusion_accuracy"])
