"""Node failure in simulation: a lost node, a lost group (then --resume), a raising handler."""

import json
import math
import os

import pytest

from papm.shared.config import PHASES

from conftest import run_papm

pytestmark = pytest.mark.slow  # whole simulations with failure drills: `pytest -m slow`, run by CI after the default tests

FAST = ["--set", "base-rounds=1", "--set", "base-epochs=2", "--set", "fusion-rounds=2", "--set", "finetune-epochs=2",
        "--set", "budget=0.5"]


def _sets(*items):
    return [a for item in items for a in ("--set", item)]


def _env(fault):
    return {**os.environ, "PAPM_INJECT_FAULT": fault}


def test_group_with_two_nodes_survives_losing_one(tmp_path):
    run = tmp_path / "r"
    # the simulation runs one node per CPU at a time: an exchange with 4 nodes waits `timeout` per turn
    wait = 20 * math.ceil(4 / (os.cpu_count() or 1))
    r = run_papm("simulate", *FAST, *_sets("nodes=4", "devices=2", "timeout=20"), "--run-dir", run, cwd=tmp_path,
                 env=_env(f"train.finetune:1:hang={wait + 30}"))
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == list(PHASES)
    assert [f["partition_id"] for f in state["failures"]] == [1]
    assert f"no reply within {wait} s" in state["failures"][0]["reason"]
    summary = (run / "summary.md").read_text()
    assert "node with partition-id 1 failed" in summary and "phase prune" in summary
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["federated"]["nodes"] == 3  # the lost node is out for the rest of the run


def test_losing_a_whole_group_stops_clearly_and_resume_continues(tmp_path):
    run = tmp_path / "r"
    args = [*FAST, *_sets("nodes=2", "devices=2", "timeout=60"), "--run-dir", run]
    r = run_papm("simulate", *args, cwd=tmp_path, env=_env("query.apoz:0:raise"))
    assert r.returncode == 2
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and "lost every node" in last[0] and "--resume" in last[0], r.stderr[-2000:]
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == ["base", "statistics", "assignment"]
    assert state["failures"][0]["partition_id"] == 0 and "injected fault" in state["failures"][0]["reason"]
    base_stamp = (run / "base.pt").stat().st_mtime_ns
    r = run_papm("simulate", *args, "--resume", cwd=tmp_path)  # the node is back
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["completed"] == list(PHASES)
    assert (run / "base.pt").stat().st_mtime_ns == base_stamp
    summary = (run / "summary.md").read_text()  # the earlier attempt stays on record
    assert "node with partition-id 0 failed" in summary and "the run stopped in phase prune" in summary


def test_export_moves_to_the_groups_other_node(tmp_path):
    """The node that exports its group's extractor fails: the group's other node exports it."""
    run = tmp_path / "r"
    r = run_papm("simulate", *FAST, *_sets("nodes=4", "devices=2", "timeout=60"), "--run-dir", run, cwd=tmp_path,
                 env=_env("query.export:0:raise"))
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert [(f["phase"], f["partition_id"]) for f in state["failures"]] == [("export", 0)]
    group_of = {int(p): v["group"] for p, v in json.loads((run / "groups" / "assignment.json").read_text())["nodes"].items()}
    parts = json.loads((run / "devices" / "extractors.json").read_text())["parts"]
    exporter = {p["device"]: p["node_report"]["partition_id"] for p in parts}
    assert exporter[group_of[0]] != 0 and group_of[exporter[group_of[0]]] == group_of[0]
    assert (run / "bundle" / "manifest.json").exists()


def test_raising_handler_is_reported_by_partition_id(tmp_path):
    run = tmp_path / "r"
    r = run_papm("simulate", *FAST, *_sets("nodes=3", "devices=2", "timeout=60"), "--run-dir", run, cwd=tmp_path,
                 env=_env("query.class_stats:2:raise"))
    assert r.returncode == 0, r.stderr[-3000:]
    failures = json.loads((run / "state.json").read_text())["failures"]
    assert failures == [{"phase": "statistics", "partition_id": 2, "node_id": failures[0]["node_id"],
                         "reason": failures[0]["reason"]}]
    assert "injected fault on query.class_stats for partition-id 2" in failures[0]["reason"]
    assert "node with partition-id 2 failed" in (run / "summary.md").read_text()


def test_one_failed_export_item_moves_and_the_node_stays(tmp_path):
    """The base model's export fails on every node but partition-id 0: the item moves from node to
    node until one exports it, and the nodes that failed it stay in the run."""
    run = tmp_path / "r"
    r = run_papm("simulate", *FAST, *_sets("nodes=3", "devices=2", "timeout=60", "int8=true"), "--run-dir", run,
                 cwd=tmp_path, env=_env("query.export/base:1:raise,query.export/base:2:raise"))
    assert r.returncode == 0, r.stderr[-3000:]
    failures = json.loads((run / "state.json").read_text())["failures"]
    assert failures and all(f["item"] == "base" and f["left_run"] is False and f["partition_id"] in (1, 2) for f in failures)
    made = json.loads((run / "devices" / "extractors.json").read_text())
    assert made["base"]["node_report"]["partition_id"] == 0 and made["base"]["int8_rel_error"] < 0.5
    # INT8 of the base model: calibrated on all classes of the exporting node
    assert "all classes" in made["base"]["node_report"]["calibration"]["source"]
    assert json.loads((run / "evaluation.json").read_text())["federated"]["nodes"] == 3
    assert "could not export base" in (run / "summary.md").read_text()
