"""Phase 7, bundle: the edge bundle from the run directory, resumable on its own.

Parts (the devices' own ONNX files from the export phase), fusion head and base model,
checksummed, signed with ``sign-key`` when one is given, with the test accuracy measured
through ONNX Runtime as the devices will run it. Outputs: ``bundle/``, and the bundle's
accuracy added to ``evaluation.json`` and the summary.
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.common.logger import log

from ...deploy.assemble import export_run
from ...shared.files import atomic_write_json
from ..summary import write_summary

if TYPE_CHECKING:
    from ..driver import RunDriver


def run(d: RunDriver) -> None:
    _, info, _ = d.rd.load_base()
    bundle = export_run(d.rd.path, int8=d.cfg.int8, int8_activations=d.cfg.int8_activations, force=True, log=lambda line: log(INFO, "%s", line),
                        test_split=d.test_split(), from_run=True,
                        sign_key=str(Path(d.cfg.sign_key).expanduser()) if d.cfg.sign_key else None)
    evaluation = json.loads((d.rd.path / "evaluation.json").read_text())
    evaluation["bundle"] = {"path": "bundle", "accuracy": bundle["accuracy"],
                            "max_abs_diff": max(r["max_abs_diff"] for r in bundle["parity"])}
    atomic_write_json(d.rd.path / "evaluation.json", evaluation)
    write_summary(d.rd.path, d.cfg, info, evaluation, d.rd.metrics())
