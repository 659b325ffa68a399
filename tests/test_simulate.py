"""The federated run in Flower's simulation engine: the default demo, resume, refusals."""

import csv
import json

import pytest

from papm.shared.checkpoint import load_checkpoint
from papm.shared.config import PHASES

from conftest import run_papm

pytestmark = pytest.mark.slow  # whole simulations (Ray): `pytest -m slow`, run by CI after the default tests


def _phase_lines(run, phase):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["phase"] == phase]


def test_default_demo_end_to_end(tmp_path):
    r = run_papm("simulate", "--run-dir", tmp_path / "demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "demo"
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == list(PHASES)
    for f in ("config.json", "base.pt", "class_stats.pt", "groups/groups.csv", "groups/report.html", "groups/assignment.json",
              "fusion/head.pt", "metrics.jsonl", "summary.md", "summary.csv", "evaluation.json"):
        assert (run / f).exists(), f
    assignment = json.loads((run / "groups" / "assignment.json").read_text())
    assert assignment["k"] == 3 and sorted(int(p) for p in assignment["nodes"]) == [0, 1, 2]
    classes = sorted(c for g in assignment["groups"].values() for c in g["classes"])
    assert classes == list(range(10))
    for k in range(3):
        report = json.loads((run / "devices" / f"device-{k}" / "prune.json").read_text())
        model, _, ckpt = load_checkpoint(run / "devices" / f"device-{k}" / "pruned.pt")
        assert abs(report["reduction"] - 0.77) <= 0.01
        assert sum(p.numel() for p in model.parameters()) == report["params_after"]
        assert ckpt["meta"]["classes"] == assignment["groups"][str(k)]["classes"]
    # phase 4 ran on the nodes: one ONNX file per device, made and parity-checked by a node of its group
    made = json.loads((run / "devices" / "extractors.json").read_text())
    partition_group = {int(p): v["group"] for p, v in assignment["nodes"].items()}
    for part in made["parts"]:
        assert (run / part["file"]).is_file() and part["server_max_abs_diff"] <= 1e-4
        assert partition_group[part["node_report"]["partition_id"]] == part["device"]
    assert (run / "base.onnx").is_file() and "int8_file" not in made["base"]
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert [p["device"] for p in manifest["parts"]] == [0, 1, 2] and manifest["accuracy"]["fp32"]["split"] > 0.9
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["base"]["accuracy"] >= 0.95 and ev["fusion"]["accuracy"] >= 0.94  # the demo: ~98.6% and ~97.5%
    assert ev["federated"]["nodes"] == 3 and ev["federated"]["samples"] > 0
    summary = (run / "summary.md").read_text()
    head = {"fedavg": "MLP head by FedAvg", "lda": "LDA head from summed statistics"}[ev["fusion"]["head"]]
    assert "baseline (unsplit base model)" in summary and f"fusion (K pruned extractors + {head})" in summary
    assert "| fusion" in r.stdout and "| baseline" in r.stdout  # the results table is printed
    assert "DEPRECATED" not in r.stderr  # Flower's note about run_simulation is not the user's business
    assert "\x1b[" not in r.stderr and "INFO :" in r.stderr  # Flower's log lines without colour codes off a terminal
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert {r["name"] for r in rows if r["row"] == "accuracy"} == {"baseline", "fusion"}
    assert len(_phase_lines(run, "base")) == 8 and len(_phase_lines(run, "fusion")) == 5
    # fusion-head=auto (the default): the LDA head from one exchange, against FedAvg's best round on the nodes' validation
    (lda,), (chosen,) = _phase_lines(run, "fusion-lda"), _phase_lines(run, "fusion-selection")
    assert chosen["chosen"] == ev["fusion"]["head"] == ("lda" if lda["val_accuracy"] > max(chosen["val_accuracy"]) else "fedavg")
    # the same run dir is refused without --resume, and an earlier run is not touched
    before = (run / "base.pt").stat().st_mtime_ns
    r = run_papm("simulate", "--run-dir", run, cwd=tmp_path)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (run / "base.pt").stat().st_mtime_ns == before


def test_resume_after_a_phase_does_not_recompute_it(tmp_path):
    run = tmp_path / "r"
    fast = ["--set", "base-rounds=2", "--set", "fusion-rounds=2", "--set", "nodes=3", "--set", "devices=2", "--set", "int8=true"]
    r = run_papm("simulate", *fast, "--set", "stop-after=assignment", "--run-dir", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["completed"] == ["base", "statistics", "assignment"]
    assert not (run / "devices").exists()
    stamps = {f: (run / f).stat().st_mtime_ns for f in ("base.pt", "class_stats.pt", "groups/assignment.json")}
    # a different config is refused
    r = run_papm("simulate", *fast, "--set", "budget=0.5", "--run-dir", run, "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "budget" in r.stderr and "different config" in r.stderr
    # as if an older version had started the run: its saved config lacks a key; the user is told what it takes
    saved = json.loads((run / "config.json").read_text())
    del saved["kd-weight"]
    (run / "config.json").write_text(json.dumps(saved))
    # `--run-dir R --resume` alone: the settings are the run's own (not the defaults), its stop-after is not
    r = run_papm("simulate", "--run-dir", run, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "without config key(s) kd-weight: the phases still to run use kd-weight=0.5" in r.stderr, r.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["kd-weight"] == 0.5  # saved now: said once
    assert json.loads((run / "state.json").read_text())["completed"] == list(PHASES)
    for f, t in stamps.items():
        assert (run / f).stat().st_mtime_ns == t, f"{f} was recomputed"
    assert len(_phase_lines(run, "base")) == 2  # base rounds ran once
    assert len(_phase_lines(run, "statistics")) == 1
    assert (run / "summary.md").exists()
    # int8=true: every device's INT8 file was calibrated on its exporting node's own training images
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    nodes = json.loads((run / "groups" / "assignment.json").read_text())["nodes"]
    for part in manifest["parts"]:
        assert "int8" in part["files"]
        pid = part["int8_calibration"]["source"].split()[1]
        assert nodes[pid]["group"] == part["device"] and part["int8_calibration"]["samples"] > 0
    acc = manifest["accuracy"]
    assert acc["int8"]["split"] >= acc["fp32"]["split"] - 0.03  # INT8 within 3 points of fp32 on digits
