"""One config schema: defaults, files, --set, Flower's run config; bad keys and values by name."""

import tomllib
from pathlib import Path

import pytest

from papm.shared.config import RunConfig
from papm.shared.errors import PapmError

from conftest import run_papm

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_mirrors_the_dataclass_defaults():
    flwr_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_cfg == RunConfig().to_flower()
    # and Flower's run config builds the same config
    assert RunConfig.from_mapping(flwr_cfg, source="run config") == RunConfig()


def test_file_then_set_overrides(tmp_path):
    (tmp_path / "my.toml").write_text('devices = 4\nnodes = 8\ncriterion = "l1"\nkd = true\n')
    cfg = RunConfig.from_file(tmp_path / "my.toml")
    cfg = RunConfig.from_overrides(["devices=5", "nodes=10", "budget=0.5"], cfg)
    assert (cfg.devices, cfg.nodes, cfg.criterion, cfg.kd, cfg.budget) == (5, 10, "l1", True, 0.5)
    (tmp_path / "my.yaml").write_text("devices: 2\nfusion-rounds: 7\n")
    assert RunConfig.from_file(tmp_path / "my.yaml").fusion_rounds == 7


@pytest.mark.parametrize("items,needle", [
    (["devicez=3"], "unknown --set key 'devicez'"),
    (["nodes=three"], "'nodes' must be an integer"),
    (["budget=1.2"], "budget must be in (0, 1)"),
    (["kd=maybe"], "'kd' must be true or false"),
    (["kd-weight=1.5"], "kd-weight must be in [0, 1]"),
    (["kd-temperature=0"], "kd-temperature must be > 0"),
    (["kd-temperature=nan"], "kd-temperature"),
    (["devices=5", "nodes=4"], "nodes (4) must be >= devices (5)"),
    (["criterion=taylor"], "criterion must be papm"),
    (["devices"], "--set expects key=value"),
    (["val-fraction=0"], "fusion-head=auto keeps the head the nodes' validation images like best"),
])
def test_bad_overrides_are_named(items, needle):
    with pytest.raises(PapmError) as e:
        RunConfig.from_overrides(items)
    assert needle in str(e.value) and "; " in str(e.value), str(e.value)  # a problem and its fix


def test_no_validation_split_with_a_head_that_needs_none():
    assert RunConfig.from_overrides(["val-fraction=0", "fusion-head=fedavg"]).val_fraction == 0
    assert RunConfig.from_overrides(["val-fraction=0", "fusion-head=lda"]).fusion_head == "lda"


def test_bad_config_file(tmp_path):
    (tmp_path / "bad.toml").write_text("devices = \n")
    with pytest.raises(PapmError, match="cannot parse config file"):
        RunConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("fusion_round = 3\n")
    with pytest.raises(PapmError, match="unknown config file typo.toml key 'fusion_round'"):
        RunConfig.from_file(tmp_path / "typo.toml")


@pytest.mark.parametrize("name,text,needle", [
    ("dup.toml", "budget = 0.5\nbudget = 0.7\n", "cannot parse config file"),
    ("dup.yaml", "budget: 0.5\nbudget: 0.7\n", "key 'budget' is written twice (line 2)"),  # PyYAML keeps 0.7 silently
    ("nested-dup.yaml", "papm:\n  devices: 2\n  devices: 4\n", "key 'devices' is written twice (line 3)"),
    ("stray.toml", "budget = 0.5\n[papm]\ndevices = 2\n", "sets budget outside its [papm] table"),
    ("stray.yaml", "budget: 0.5\npapm:\n  devices: 2\n", "sets budget outside its [papm] table"),
    ("list.yaml", "- devices: 2\n", "must hold a table of key = value pairs, not a list"),
    ("bad.yaml", "devices: [2\n", "cannot parse config file"),
])
def test_config_files_that_would_be_misread_are_refused_in_one_line_with_a_fix(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(PapmError) as e:
        RunConfig.from_file(tmp_path / name)
    msg = str(e.value)
    assert needle in msg and "; " in msg and "\n" not in msg, msg


def test_a_pyproject_keeps_its_other_tables_beside_the_run_config(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.flwr.app.config]\ndevices = 2\nnodes = 4\n')
    assert (RunConfig.from_file(tmp_path / "pyproject.toml").devices, RunConfig.from_file(tmp_path / "pyproject.toml").nodes) == (2, 4)
    (tmp_path / "other.yaml").write_text("1: not ours\npapm:\n  devices: 2\n")  # a YAML key of another type beside it
    assert RunConfig.from_file(tmp_path / "other.yaml").devices == 2


def test_simulate_rejects_bad_config_in_one_line(tmp_path):
    for sets, needle in ((["nodes=2"], "nodes (2) must be >= devices (3)"),
                         (["devices=11", "nodes=11"], "K=11 device groups is impossible with 10 classes")):
        args = [a for s in sets for a in ("--set", s)]
        r = run_papm("simulate", *args, "--run-dir", tmp_path / "r", cwd=tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
        assert not (tmp_path / "r").exists()


def test_fingerprint_ignores_runtime_keys():
    a = RunConfig()
    b = RunConfig.from_overrides(["run-dir=elsewhere", "timeout=5", "device=cpu"])
    assert a.fingerprint() == b.fingerprint() and a.differences(b) == []
    assert RunConfig.from_overrides(["budget=0.5"]).differences(a) == ["budget"]
