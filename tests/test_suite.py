"""Experiment suites: grid expansion and names, dry-run, resume, shared base models, the report's rows and
statistics, one-line errors for bad suite files, and the baselines' parameter counts."""

import csv
import json
from pathlib import Path

import pytest

from papm.deploy.suite_report import write_report
from papm.shared.errors import PapmError
from papm.simulations.suite import plan_suite, run_name, run_suite

from conftest import run_papm

TINY = {"nodes": 2, "devices": 2, "base-rounds": 1, "base-epochs": 1, "finetune-epochs": 1, "finetune-rounds": 1,
        "fusion-rounds": 1, "device": "cpu", "min-partition-size": 4}


def write_suite(path, grid, seeds=(0,), variants=(), name="t", engine="direct", base=None):
    import yaml

    doc = {"name": name, "engine": engine, "base": {**TINY, **(base or {})}, "grid": grid, "seeds": list(seeds)}
    if variants:
        doc["variants"] = list(variants)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_grid_expansion_and_names(tmp_path):
    suite = plan_suite(write_suite(tmp_path / "s.yaml", {"criterion": ["papm", "l1"], "budget": [0.5, 0.7]}, seeds=[0, 1],
                                   variants=[{"grouping": "random"}]), runs_dir=str(tmp_path / "runs"))
    names = [r.name for r in suite.runs]
    assert len(names) == 2 * 2 * 2 + 2 and len(set(names)) == len(names)
    assert "criterion=l1,budget=0.5,seed=1" in names and "grouping=random,seed=0" in names
    run = next(r for r in suite.runs if r.name == "criterion=l1,budget=0.7,seed=0")
    assert (run.cfg.criterion, run.cfg.budget, run.cfg.seed, run.cfg.nodes) == ("l1", 0.7, 0, 2)
    assert run.cfg.run_dir == str(tmp_path / "runs" / run.name)
    # one base model per seed: the first run of each seed trains it, the others load it
    trainers = [r.name for r in suite.runs if r.shares_base_with is None]
    assert trainers == ["criterion=papm,budget=0.5,seed=0", "criterion=papm,budget=0.5,seed=1"]
    assert run.shares_base_with == "criterion=papm,budget=0.5,seed=0"
    assert run_name({"alpha": 0.25, "x": "a/b c"}) == "alpha=0.25,x=a_b_c"


def test_dry_run_writes_nothing(tmp_path):
    path = write_suite(tmp_path / "s.yaml", {"alpha": [0.0, 1.0]}, seeds=[0, 1, 2])
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_papm("suite", path, "--dry-run", "--runs-dir", tmp_path / "runs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "6 runs" in r.stdout and "alpha=1.0,seed=2" not in r.stdout  # a table, not paths
    assert sorted(p.name for p in tmp_path.iterdir()) == before


SHIPPED_SUITES = sorted((Path(__file__).resolve().parents[1] / "simulations" / "suites").glob("*.yaml"))


def test_the_shipped_suites_are_found():
    assert {"ablation.yaml", "compression.yaml", "cifar10-full.yaml"} <= {p.name for p in SHIPPED_SUITES}


@pytest.mark.parametrize("path", SHIPPED_SUITES, ids=lambda p: p.name)
def test_every_shipped_suite_file_plans_every_run(path):
    """A suite file we ship is a command a user runs as it is: every run's config must pass validation
    (a GPU suite included: nothing here needs the GPU or the data to plan it)."""
    import math

    import yaml

    doc = yaml.safe_load(path.read_text())
    suite = plan_suite(path, runs_dir="planned")
    grid_runs = math.prod(len(v) for v in doc.get("grid", {}).values()) if doc.get("grid") else 0
    assert len(suite.runs) == (grid_runs + len(doc.get("variants", []))) * len(doc.get("seeds", [0]))
    assert len({r.name for r in suite.runs}) == len(suite.runs)


@pytest.mark.parametrize("doc,needle", [
    ("name: x\ngrid: {}\nseeds: [0]\n", "grid is empty"),
    ("name: x\ngrid: {budget: 0.5}\n", "non-empty list of values"),
    ("name: x\ngird: {budget: [0.5]}\n", "unknown suite key 'gird'"),
    ("name: x\ngrid: {budgett: [0.5]}\n", "unknown suite"),
    ("name: x\ngrid: {budget: [1.5]}\n", "budget must be in (0, 1)"),
    ("name: x\ngrid: {alpha: [0.5]}\nseeds: [zero]\n", "seeds must be a non-empty list of integers"),
    ("name: x\ngrid: {alpha: [0.5]}\nengine: warp\n", "engine must be simulation or direct"),
    ("[not yaml\n", "cannot parse suite file"),
])
def test_a_bad_suite_file_is_one_line(tmp_path, doc, needle):
    (tmp_path / "bad.yaml").write_text(doc)
    r = run_papm("suite", tmp_path / "bad.yaml", "--dry-run", cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_suite_runs_shares_the_base_resumes_and_reports(tmp_path):
    """Two seeds x two alphas and a run that fails (a partition it cannot make): the failure is recorded and
    the others finish; --resume skips the finished runs and tries the failed one again; the report's rows
    are the run directories' numbers and its mean/std are over the seeds."""
    path = write_suite(tmp_path / "s.yaml", {"alpha": [0.0, 1.0]}, seeds=[0, 1], variants=[{"min-partition-size": 100000}])
    suite = plan_suite(path, runs_dir=str(tmp_path / "runs"))
    said = []
    record = run_suite(suite, say=said.append)
    failed = [n for n, e in record["runs"].items() if e["status"] == "failed"]
    assert len(failed) == 2 and all("min-partition-size" in record["runs"][n]["error"] for n in failed)
    done = [n for n, e in record["runs"].items() if e["status"] == "done"]
    assert len(done) == 4
    # the shared base: the alpha=1.0 runs loaded the alpha=0.0 runs' base model (one base training per seed)
    for seed in (0, 1):
        trained = json.loads((tmp_path / "runs" / f"alpha=0.0,seed={seed}" / "config.json").read_text())
        loaded = json.loads((tmp_path / "runs" / f"alpha=1.0,seed={seed}" / "config.json").read_text())
        assert trained["base-checkpoint"] == "" and loaded["base-checkpoint"].endswith(f"alpha=0.0,seed={seed}/base.pt")
        assert not any(json.loads(line)["phase"] == "base"
                       for line in (tmp_path / "runs" / f"alpha=1.0,seed={seed}" / "metrics.jsonl").read_text().splitlines())
    stamps = {n: (tmp_path / "runs" / n / "evaluation.json").stat().st_mtime_ns for n in done}
    record = run_suite(plan_suite(path, runs_dir=str(tmp_path / "runs")), resume=True, say=said.append)
    assert {n: (tmp_path / "runs" / n / "evaluation.json").stat().st_mtime_ns for n in done} == stamps
    assert all(record["runs"][n]["attempts"] == 2 for n in failed)
    assert sum("skipped" in line for line in said) == 4
    # the report
    paths = write_report(tmp_path / "runs", measure_latency=True)
    rows = list(csv.DictReader(open(paths["summary_all.csv"])))
    assert sorted(r["run"] for r in rows) == sorted(done)
    for r in rows:
        ev = json.loads((tmp_path / "runs" / r["run"] / "evaluation.json").read_text())
        assert float(r["fusion_accuracy"]) == pytest.approx(ev["fusion"]["accuracy"])
        assert float(r["fusion_minus_base"]) == pytest.approx(ev["fusion"]["accuracy"] - ev["base"]["accuracy"])
        assert float(r["split_latency_ms"]) > 0 and r["alpha"] in ("0.0", "1.0") and r["seed"] in ("0", "1")
    md = paths["summary_all.md"].read_text()
    accs = [float(r["fusion_accuracy"]) for r in rows if r["alpha"] == "0.0"]
    mean = sum(accs) / 2
    std = (sum((a - mean) ** 2 for a in accs)) ** 0.5  # sample standard deviation of two values
    assert f"{100 * mean:.2f} +- {100 * std:.2f}" in md
    assert "## Failed or unfinished runs" in md and "min-partition-size" in md
    assert "| class | base | fusion | device group |" in md
    # a run made before a config key existed (its config.json lacks it) reports the key's default, and a key
    # that no run changed from its default does not become a column
    cfg = tmp_path / "runs" / done[0] / "config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "weight-quant"}))
    rows = list(csv.DictReader(open(write_report(tmp_path / "runs", measure_latency=False)["summary_all.csv"])))
    assert len(rows) == 4 and "weight-quant" not in rows[0]


def test_baselines_keep_the_parameters_they_promise(tmp_path):
    """(b) one model at one device's budget, (c) one model at the K parts' total: parameter counts within 1 point."""
    path = write_suite(tmp_path / "s.yaml", {}, variants=[{"baseline": "one-model-device-budget"},
                                                          {"baseline": "one-model-total-budget"}, {"grouping": "random"}],
                       base={"devices": 3, "nodes": 3, "budget": 0.77})
    suite = plan_suite(path, runs_dir=str(tmp_path / "runs"))
    record = run_suite(suite, say=lambda _: None)
    assert all(e["status"] == "done" for e in record["runs"].values()), record
    runs = tmp_path / "runs"
    device = json.loads((runs / "baseline=one-model-device-budget,seed=0" / "devices" / "device-0" / "prune.json").read_text())
    total = json.loads((runs / "baseline=one-model-total-budget,seed=0" / "devices" / "device-0" / "prune.json").read_text())
    assert not (runs / "baseline=one-model-device-budget,seed=0" / "devices" / "device-1").exists()  # one model
    assert abs(device["params_after"] / device["params_before"] - 0.23) <= 0.01
    assert abs(total["params_after"] / total["params_before"] - 3 * 0.23) <= 0.01
    assert sorted(device["classes"]) == list(range(10))
    groups = json.loads((runs / "grouping=random,seed=0" / "groups" / "assignment.json").read_text())
    assert groups["grouping"] == "random" and groups["k"] == 3
    with pytest.raises(PapmError, match="as large as the base"):
        plan_suite(write_suite(tmp_path / "x.yaml", {}, variants=[{"baseline": "one-model-total-budget", "budget": 0.5}],
                               base={"devices": 3, "nodes": 3}))


def test_the_report_shows_the_int8_split_through_onnx_runtime_where_a_run_exported_it(tmp_path):
    path = write_suite(tmp_path / "s.yaml", {"int8": [False, True]})
    record = run_suite(plan_suite(path, runs_dir=str(tmp_path / "runs")), say=lambda _: None)
    assert all(e["status"] == "done" for e in record["runs"].values()), record
    paths = write_report(tmp_path / "runs", measure_latency=True)
    rows = {r["int8"]: r for r in csv.DictReader(open(paths["summary_all.csv"]))}
    ev = json.loads((tmp_path / "runs" / "int8=true,seed=0" / "evaluation.json").read_text())
    assert float(rows["True"]["int8_split_accuracy"]) == pytest.approx(ev["bundle"]["accuracy"]["int8"]["split"])
    assert float(rows["True"]["int8_split_latency_ms"]) > 0
    assert rows["False"]["int8_split_accuracy"] == "" and rows["False"]["int8_split_latency_ms"] == ""
    md = paths["summary_all.md"].read_text()
    assert "| INT8 split (ONNX Runtime) | INT8 split latency ms |" in md
    assert f"{100 * ev['bundle']['accuracy']['int8']['split']:.2f} +- 0.00" in md


@pytest.mark.parametrize("name", ["ablation", "cifar10-subset"])
def test_readme_tables_are_the_committed_reports(name):
    """The README's headline tables are `papm report`'s output (benchmarks/suite-NAME), never typed by hand."""
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split(f"<!-- {name} table: generated by papm report -->\n")[1].split(f"<!-- end of {name} table -->")[0]
    report = (root / "benchmarks" / f"suite-{name}" / "summary_all.md").read_text()
    assert table.strip() and table.strip() in report


def test_readme_whole_cifar10_table_is_the_recorded_runs():
    """The README's whole-CIFAR-10 rows are typed, so each names its raw record and must match it: partition, K, nodes,
    base, fusion and their difference as bench_cifar.py wrote them."""
    import json

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split("<!-- whole-cifar10 table:")[1].split("<!-- end of whole-cifar10 table -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[3:] if line.startswith("|")]
    measured = [r for r in rows if r[-1] != "-"]
    assert len(measured) >= 5
    for partition, k, nodes, base, fusion, diff, _, source in measured:
        record, name = source.split(": ")
        runs = {r["name"]: r for r in json.loads((root / "benchmarks" / f"{record}.json").read_text())["runs"]}
        run = runs[name]
        assert name.startswith(f"{'iid' if partition == 'IID' else 'dirichlet'}-k{k}-n{nodes}")
        assert f"devices={k}" in run["settings"] and f"nodes={nodes}" in run["settings"]
        assert (base, fusion) == (f"{100 * run['base_accuracy']:.2f}", f"{100 * run['fusion_accuracy']:.2f}"), name
        assert diff.strip("*") == f"{100 * run['fusion_minus_base']:+.2f}", name
