"""The run directory keeps its promises: --force deletes only a run's own files in a folder marked as a
run, writes are durable (fsync) with the right permissions, a finished run resumes without Flower."""

import io
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from papm.server.run_directory import MARKER, RunDirectory
from papm.shared import files
from papm.shared.config import RunConfig
from papm.shared.fusion import FusionHead, feature_sums

from conftest import run_papm


def test_force_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    (work / "config.json").write_text('{"mine": true}')
    (work / "state.json").write_text("{}")  # even both names, without the marker and a run's config inside
    (work / "thesis.tex").write_text("years of work")
    (work / "data").mkdir()
    (work / "data" / "x.png").write_bytes(b"png")
    before = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
    r = run_papm("simulate", "--run-dir", work, "--force", cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "not a PAPM run directory" in errors[0], r.stderr[-2000:]
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == before
    assert (work / "thesis.tex").read_text() == "years of work"
    # the current folder (an empty run-dir) is refused the same way
    r = run_papm("simulate", "--set", "run-dir=", "--force", cwd=work)
    assert r.returncode == 2 and (work / "thesis.tex").exists()
    # without --force it is refused too, and told that --force would not apply
    r = run_papm("simulate", "--run-dir", work, cwd=tmp_path)
    assert r.returncode == 2 and "no .papm-run marker" in r.stderr and "--force" not in r.stderr
    (work / "state.json").unlink()  # a non-empty folder without a run: a run is never written into it
    r = run_papm("simulate", "--run-dir", work, cwd=tmp_path)
    assert r.returncode == 2 and "holds files but no PAPM run" in r.stderr


def test_clear_removes_only_what_a_run_wrote(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.start(RunConfig.from_overrides([f"run-dir={run.path}"]), resume=False)
    for name in ("base.pt", "metrics.jsonl", "devices/device-0/pruned.pt", "bundle/manifest.json", ".base.pt.1234.tmp"):
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_text("x")
    (run.path / "my-notes.md").write_text("keep me")
    (run.path / "plots").mkdir()
    removed = run.clear()
    assert {"config.json", "state.json", "base.pt", "metrics.jsonl", "devices", "bundle"} <= set(removed)
    assert sorted(p.name for p in run.path.iterdir()) == sorted([MARKER, "my-notes.md", "plots"])
    run.start(RunConfig.from_overrides([f"run-dir={run.path}"]), resume=False)  # a fresh run may start here again


def test_resume_names_the_keys_a_run_saved_by_an_older_version_lacks(tmp_path):
    run = RunDirectory(tmp_path / "run")
    cfg = RunConfig.from_overrides([f"run-dir={run.path}", "kd=true"])
    run.start(cfg, resume=False)
    assert run.new_keys == {}
    run.start(cfg, resume=True)
    assert run.new_keys == {}  # the same version: nothing new
    saved = json.loads(run.config_file.read_text())
    for key in ("kd-weight", "kd-temperature", "timeout"):  # timeout is runtime-only: not worth a word
        del saved[key]
    run.config_file.write_text(json.dumps(saved))
    assert run.start(cfg, resume=True) == []
    assert run.new_keys == {"kd-weight": 0.5, "kd-temperature": 4.0}
    run.start(cfg, resume=True)
    assert run.new_keys == {}  # the config was saved whole on resume


def test_atomic_writes_are_flushed_and_keep_the_umask(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    umask_calls = []
    real_umask = os.umask
    monkeypatch.setattr(files.os, "umask", lambda *a: umask_calls.append(a) or 0)
    path = files.atomic_write_text(tmp_path / "out" / "result.json", "{}")
    assert synced[-1] == str(tmp_path / "out")  # the folder, after the rename
    assert any(".result.json." in s for s in synced[:-1])  # the file, before the rename
    assert umask_calls == []  # the process umask is never set (it is process-wide and races with threads)
    old = real_umask(0o027)
    try:
        assert stat.S_IMODE(files.atomic_write_text(tmp_path / "g.txt", "x").stat().st_mode) == 0o640
        assert stat.S_IMODE(files.atomic_write_bytes(tmp_path / "k", b"k", mode=0o600).stat().st_mode) == 0o600
    finally:
        real_umask(old)
    assert umask_calls == []
    assert path.read_text() == "{}" and not list((tmp_path / "out").glob(".*.tmp"))


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = files.atomic_write_text(tmp_path / "a.json", "old")

    def broken(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_fusion_features_are_standardised_like_standardscaler():
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(0)
    feats = torch.rand(200, 5).double() * torch.tensor([1.0, 3.0, 0.0, 1e-9, 2.0]).double()
    feats[:, 2] = 0.7  # a dead channel: constant
    head = FusionHead([5], 3, hidden=0)
    head.set_normalisation(*feature_sums(feats))
    ref = StandardScaler().fit(feats.numpy())
    assert np.allclose(head.mean.numpy(), ref.mean_, atol=1e-6)
    assert np.allclose(head.std.numpy(), ref.scale_, rtol=1e-5)
    assert head.std[2] == 1.0  # constant feature: scale 1, not 1 / (tiny std)


def test_resume_of_a_finished_run_does_not_start_flower(tmp_path):
    from papm.simulations.direct import run_direct

    run = tmp_path / "run"
    run_direct(RunConfig.from_overrides([f"run-dir={run}", "nodes=2", "devices=2", "base-rounds=1", "base-epochs=1",
                                         "finetune-epochs=1", "fusion-rounds=1", "device=cpu"]))
    code = ("import sys; sys.modules['flwr.simulation'] = None; sys.modules['ray'] = None\n"
            "import papm.shared.node_data as node_data\n"  # nor does it read the nodes' training data again
            "node_data.check_partitions = lambda cfg: sys.exit('the training data was read')\n"
            "from papm.cli import main\n"
            f"sys.exit(main(['simulate', '--run-dir', {str(run)!r}, '--resume', '--set', 'nodes=2', '--set', 'devices=2',"
            " '--set', 'base-rounds=1', '--set', 'base-epochs=1', '--set', 'finetune-epochs=1', '--set', 'fusion-rounds=1',"
            " '--set', 'device=cpu']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| fusion" in r.stdout  # the summary, printed from the run directory
    assert json.loads((run / "state.json").read_text())["completed"][-1] == "bundle"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from papm.simulations.direct import run_direct

    run = tmp_path_factory.mktemp("finished") / "run"
    run_direct(RunConfig.from_overrides([f"run-dir={run}", "nodes=2", "devices=2", "base-rounds=1", "base-epochs=1",
                                         "finetune-epochs=1", "fusion-rounds=1", "device=cpu"]))
    return run


def test_export_int8_adds_to_the_runs_own_bundle(finished_run, tmp_path):
    """The README's sequence: a finished run, then `papm export RUN --int8` (no --force: it is the run's own bundle)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = json.loads((run / "bundle" / "manifest.json").read_text())
    assert all(set(p["files"]) == {"fp32"} for p in before["parts"])
    r = run_papm("export", run, "--int8", "--calib-samples", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    after = json.loads((run / "bundle" / "manifest.json").read_text())
    assert all(set(p["files"]) == {"fp32", "int8"} for p in after["parts"])
    # again without --int8: the INT8 files stay (precisions are added, never dropped), and so do files no export
    # writes: papm bench's tables, the user's notes
    (run / "bundle" / "bench.md").write_text("| latency |")
    (run / "bundle" / "notes").mkdir()
    (run / "bundle" / "notes" / "NOTES.txt").write_text("mine")
    r = run_papm("export", run)
    assert r.returncode == 0 and "kept bench.md, notes/NOTES.txt from the earlier bundle" in r.stdout + r.stderr, r.stderr[-2000:]
    assert all("int8" in p["files"] for p in json.loads((run / "bundle" / "manifest.json").read_text())["parts"])
    assert (run / "bundle" / "bench.md").read_text() == "| latency |"
    assert (run / "bundle" / "notes" / "NOTES.txt").read_text() == "mine"
    # a signed bundle is re-signed only with a key: without one it is refused and left as it was
    keys = tmp_path / "keys"
    r = run_papm("export", run, "--new-key", keys)
    assert r.returncode == 0 and (run / "bundle" / "manifest.sig").exists(), r.stderr[-2000:]
    sig = (run / "bundle" / "manifest.sig").read_bytes()
    r = run_papm("export", run)
    assert r.returncode == 2 and "is signed" in r.stderr and (run / "bundle" / "manifest.sig").read_bytes() == sig
    assert run_papm("export", run, "--sign-key", keys / "papm-signing-key.pem").returncode == 0


def test_export_never_replaces_a_folder_that_is_not_a_bundle(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    for out in (run, tmp_path):  # the run directory itself, and its parent
        r = run_papm("export", run, "--out", out, "--force")
        assert r.returncode == 2 and "would replace the run directory" in r.stderr, r.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = run_papm("export", run, "--out", mine, "--force")
    assert r.returncode == 2 and "not a PAPM edge bundle" in r.stderr and (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before


def test_new_key_is_kept_only_when_the_export_succeeds(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    keys = tmp_path / "keys"
    (run / "fusion" / "head.pt").write_bytes(b"damaged")
    r = run_papm("export", run, "--out", tmp_path / "b", "--new-key", keys / "site-a")
    assert r.returncode == 2 and not keys.exists()  # the folders it made for the keys go with the failed export
    keys.mkdir()
    (keys / "README").write_text("mine")
    r = run_papm("export", run, "--out", tmp_path / "b", "--new-key", keys)
    assert r.returncode == 2 and sorted(p.name for p in keys.iterdir()) == ["README"]  # a folder it did not make stays
    (keys / "README").unlink()
    for inside in (tmp_path / "b", tmp_path / "b" / "keys"):  # the private key would ship with the bundle
        r = run_papm("export", run, "--out", tmp_path / "b", "--new-key", inside)
        assert r.returncode == 2 and "is inside the bundle folder" in r.stderr and not inside.exists()
    shutil.copy(finished_run / "fusion" / "head.pt", run / "fusion" / "head.pt")
    r = run_papm("export", run, "--out", tmp_path / "b", "--new-key", keys)  # the retry is not stuck
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in keys.iterdir()) == ["papm-signing-key.pem", "papm-signing-key.pub.pem"]


def test_curves_png_draws_the_rounds_each_stage_logged(finished_run):
    """curves.png (base training, each device's fine-tuning, the fusion head), linked from summary.md; a run that
    logged no test accuracy per round gets none."""
    import matplotlib.image

    from papm.server.curves import curves_png

    png = finished_run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![the server's test accuracy round by round](curves.png)" in (finished_run / "summary.md").read_text()
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    width = matplotlib.image.imread(png).shape[1]  # one panel per stage: base, fine-tuning, fusion
    only_fusion = curves_png([m for m in metrics if m["phase"].startswith("fusion")])
    assert matplotlib.image.imread(io.BytesIO(only_fusion)).shape[1] * 3 == pytest.approx(width, rel=0.02)
    assert curves_png([m for m in metrics if m["phase"] in ("statistics", "assignment", "prune")]) is None


def test_evaluation_keeps_confusion_counts_and_summary_says_where_errors_go(finished_run):
    """evaluation.json's confusion counts agree with the accuracies beside them (rows: true class, columns: predicted),
    and summary.md splits the errors into those inside one device's group and those between groups."""
    ev = json.loads((finished_run / "evaluation.json").read_text())
    summary = (finished_run / "summary.md").read_text()
    for key in ("base", "fusion"):
        conf = np.asarray(ev[key]["confusion"])
        assert conf.shape == (10, 10) and conf.sum() == ev["test_samples"]
        assert np.trace(conf) / conf.sum() == pytest.approx(ev[key]["accuracy"])
        for c, name in enumerate(str(i) for i in range(10)):
            assert conf[c, c] / conf[c].sum() == pytest.approx(ev[key]["per_class"][name])
    assert "## Where the errors go" in summary
    errors = int(np.asarray(ev["fusion"]["confusion"]).sum() - np.trace(np.asarray(ev["fusion"]["confusion"])))
    assert f"| fusion | {errors:,} |" in summary


def test_errors_table_splits_mistakes_by_group():
    """Hand-made counts: 3 classes, groups {a, b} and {c}."""
    from papm.server.summary import errors_table
    from papm.shared.datasets import DatasetInfo

    info = DatasetInfo("toy", ["a", "b", "c"], 3, 8, [0.0] * 3, [1.0] * 3, hflip=False, crop_padding=0)
    base = [[8, 1, 1], [0, 10, 0], [0, 0, 10]]    # 2 errors: a->b inside the group, a->c between groups
    fusion = [[5, 1, 4], [2, 8, 0], [0, 0, 10]]   # 7 errors: a->b, b->a (3 inside), a->c x4 (between)
    ev = {"base": {"confusion": base}, "fusion": {"confusion": fusion},
          "devices": [{"class_names": ["a", "b"]}, {"class_names": ["c"]}]}
    lines = errors_table(info, ev)
    assert "| baseline | 2 | 1 | 1 |" in lines and "| fusion | 7 | 3 | 4 |" in lines
    grown = [line for line in lines if line.startswith("- ")]
    assert grown == ["- a taken for c: 1 -> 4 (+3, between groups)", "- b taken for a: 0 -> 2 (+2, one group)"]
    assert errors_table(info, {"base": {}, "fusion": {}, "devices": []}) == []  # runs from before the counts were kept


def test_a_start_that_computed_nothing_does_not_block_the_corrected_command(tmp_path):
    """A start that failed before its first result (a refused checkpoint, nodes that never answered) wrote only the
    marker, config and state: the corrected command starts there afresh without --force. A folder with a completed
    phase or a saved round still needs --resume or --force, and files papm did not write are never touched."""
    from papm.shared.checkpoint import resolve_run_inputs

    run = tmp_path / "run"
    first = resolve_run_inputs(RunConfig.from_overrides([f"run-dir={run}", "budget=0.5"]))
    RunDirectory(run).start(first, resume=False)
    (run / "notes.txt").write_text("mine")
    corrected = resolve_run_inputs(RunConfig.from_overrides([f"run-dir={run}", "budget=0.6"]))
    assert RunDirectory(run).start(corrected, resume=False) == []
    assert json.loads((run / "config.json").read_text())["budget"] == 0.6 and (run / "notes.txt").read_text() == "mine"
    rd = RunDirectory(run)
    rd.save_progress("base", {"round": 1})  # a saved round is a result
    with pytest.raises(Exception, match="already holds a run"):
        RunDirectory(run).start(first, resume=False)
    rd.clear_progress("base")
    rd.mark_done("base")
    assert not rd.discard_failed_start()
    with pytest.raises(Exception, match="already holds a run"):
        RunDirectory(run).start(first, resume=False)
    assert json.loads((run / "config.json").read_text())["budget"] == 0.6


def test_a_damaged_device_checkpoint_is_not_sent_to_papm_train(finished_run, tmp_path):
    """A run's pruned.pt came from its prune phase: the fix a user is given is the run's, not `papm train`/`prune`."""
    from papm.shared.errors import PapmError

    run = tmp_path / "run"
    (run / "devices" / "device-1").mkdir(parents=True)
    (run / "devices" / "device-1" / "pruned.pt").write_bytes((finished_run / "devices" / "device-1" / "pruned.pt").read_bytes()[:500])
    for k, problem in ((1, "not a readable checkpoint"), (0, "checkpoint not found")):
        with pytest.raises(PapmError) as e:
            RunDirectory(run).load_extractor(k)
        message = str(e.value)
        assert problem in message and "papm train" not in message and f"--run-dir {run} --force" in message, message
    assert RunDirectory(finished_run).load_extractor(1)[1]["width"] > 0  # an intact one loads
