"""Phase 1, statistics: every node returns exact class sums of the base model's outputs on its
training data; their sum is the centralised statistics. Outputs: ``class_stats.pt`` and the
group report for every K (``groups/``)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import torch

from ...client.records import record_state
from ...shared.group_report import write_group_report
from ...shared.class_stats import ClassStatistics
from ...shared.errors import PapmError
from ...shared.files import atomic_write_bytes
from ...shared.grouping import analyse_stats, check_k

if TYPE_CHECKING:
    from ..driver import RunDriver


def run(d: RunDriver) -> None:
    d.rd.rewind_metrics({"statistics": None})
    base, info, args = d.rd.load_base()
    papm, arrays = d.model_payload(base, args)
    replies = d.send("statistics", "query.class_stats",
                     {n: d.content({**papm, "data-info": info.to_dict()}, **arrays) for n in d.nodes})
    if not replies:
        raise PapmError("no node returned class statistics; check the nodes and run again with --resume")
    stats = ClassStatistics.zeros(info.num_classes)
    for c in replies.values():  # in partition order (d.send): the same sums to the last bit in every run
        stats = stats + ClassStatistics.from_arrays(record_state(c["stats"]))
    if (stats.counts == 0).any():  # grouping needs every class's mean outputs; name the classes, not their indices
        missing = [info.class_names[c] for c in torch.nonzero(stats.counts == 0).flatten().tolist()]
        raise PapmError(f"no node holds training images of class(es) {', '.join(missing)} (of {len(replies)} nodes that "
                        "answered); give some node images of every class, or remove the class from the data and the "
                        "base model")
    buf = io.BytesIO()  # saved from memory: torch.save names the archive after the (temporary) file
    torch.save({k: v.clone() for k, v in stats.to_arrays().items()}, buf)
    atomic_write_bytes(d.rd.path / "class_stats.pt", buf.getvalue())
    check_k(d.cfg.devices, info.num_classes)
    analysis = analyse_stats(stats, info.class_names, d.cfg.similarity, d.cfg.outputs, d.cfg.balanced)
    analysis.extra.update({"split": "train", "nodes": len(replies)})
    write_group_report(d.rd.path / "groups", analysis)
    d.rd.log_metrics("statistics", nodes=len(replies), samples=int(stats.counts.sum()))
