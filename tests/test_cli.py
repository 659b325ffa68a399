"""`papm train` / `papm prune` as a user runs them, and one clear line per bad input."""

import json

import pytest
import torch

from papm.shared.checkpoint import load_checkpoint
from papm.shared.models import count_params

from conftest import run_papm, write_imagefolder_for_cli, write_pattern_folder


def test_train_then_prune_end_to_end(tmp_path):
    r = run_papm("train", "--dataset", "digits", "--width", "0.125", "--epochs", "2", "--out", "base.pt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "val accuracy" in r.stdout
    base, info, ckpt = load_checkpoint(tmp_path / "base.pt")
    assert info.class_names == [str(c) for c in range(10)] and info.in_channels == 1 and info.image_size == 8
    assert ckpt["model_args"]["width"] == 0.125 and len(info.mean) == 1 and info.split_seed == 0
    # prune needs no dataset flags: the checkpoint carries them
    r = run_papm("prune", "base.pt", "--classes", "3,5,8", "--budget", "0.77", "--finetune-epochs", "1",
                 "--out", "pruned.pt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "pruned.json").read_text())
    for key in ("params_before", "params_after", "reduction", "target", "criterion", "alpha", "kept_channels",
                "macs_before", "macs_after", "accuracy"):
        assert key in report
    pruned, _, pckpt = load_checkpoint(tmp_path / "pruned.pt")
    assert count_params(pruned) == report["params_after"]
    assert report["params_before"] == count_params(base)
    assert abs(report["reduction"] - 0.77) <= 0.01 and report["target"] == 0.77
    assert report["macs_after"] < report["macs_before"]
    assert {c: m.out_channels for c, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)} == report["kept_channels"]
    for stage in ("before_finetune", "after_finetune"):
        assert set(report["accuracy"][stage]) == {"all", "group"}
    assert pckpt["kind"] == "pruned"
    # the same cut with distillation from the base: the report says so, and the fine-tuning differs
    r = run_papm("prune", "base.pt", "--classes", "3,5,8", "--budget", "0.77", "--finetune-epochs", "1", "--kd",
                 "--kd-weight", "0.8", "--out", "kd.pt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kd = json.loads((tmp_path / "kd.json").read_text())
    assert (kd["finetune"]["kd"], kd["finetune"]["kd_weight"]) == (True, 0.8) and not report["finetune"]["kd"]
    assert kd["params_after"] == report["params_after"] and kd["accuracy"]["after_finetune"] != report["accuracy"]["after_finetune"]


def _one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_missing_checkpoint(tmp_path):
    line = _one_error_line(run_papm("prune", tmp_path / "nope.pt", "--classes", "1", "--budget", "0.5", cwd=tmp_path))
    assert "not found" in line and "papm train" in line


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 100)
    line = _one_error_line(run_papm("prune", "bad.pt", "--classes", "1", "--budget", "0.5", cwd=tmp_path))
    assert "bad.pt" in line and "re-create" in line


def test_checkpoint_with_pickled_module_is_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    line = _one_error_line(run_papm("prune", "pickled.pt", "--classes", "1", "--budget", "0.5", cwd=tmp_path))
    assert "pickled.pt" in line and "not a safe" in line


def test_unknown_dataset(tmp_path):
    line = _one_error_line(run_papm("train", "--dataset", "mnist", "--out", "b.pt", cwd=tmp_path))
    assert "unknown dataset 'mnist'" in line and "digits" in line


@pytest.mark.parametrize("budget", ["1.5", "0", "-0.2", "1"])
def test_budget_outside_unit_interval(tmp_path, base_ckpt, budget):
    line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", "--budget", budget, "--out", "p.pt", cwd=tmp_path))
    assert "(0, 1)" in line
    assert not (tmp_path / "p.pt").exists()


def test_budget_that_cannot_be_met(tmp_path, base_ckpt):
    line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", "--budget", "0.9999", "--out", "p.pt", cwd=tmp_path))
    assert "cannot be met" in line and "choose a budget <=" in line
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "p.json").exists()
    largest = line.split("choose a budget <= ")[1].split()[0]  # the budget it suggests is one that can be met
    done = run_papm("prune", base_ckpt, "--classes", "1", "--budget", largest, "--finetune-epochs", "0", "--out", "p.pt",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("classes,needle", [("3,12", "class id 12 is out of range"), ("3,three", "unknown class 'three'"), ("4,4", "twice")])
def test_bad_classes(tmp_path, base_ckpt, classes, needle):
    line = _one_error_line(run_papm("prune", base_ckpt, "--classes", classes, "--budget", "0.5", cwd=tmp_path))
    assert needle in line


@pytest.mark.parametrize("flags,needle", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"), (["--emphasis", "-1"], "--emphasis must be >= 1"),
    (["--apoz-samples", "0"], "--apoz-samples must be >= 1"), (["--kd", "--kd-weight", "2"], "--kd-weight must be in [0, 1]"),
    (["--kd", "--kd-temperature", "0"], "--kd-temperature must be > 0"), (["--round-to", "0"], "--round-to must be >= 1"),
    (["--classes", "4,4"], "names a class twice")])
def test_bad_prune_settings_say_the_problem_and_a_fix(tmp_path, base_ckpt, capsys, flags, needle):
    from papm.cli import main

    args = ["prune", str(base_ckpt), "--classes", "1", "--budget", "0.5", "--out", str(tmp_path / "p.pt"), *flags]
    assert main(args) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and needle in line and "\n" not in line, line
    problem, fix = line.split("; ", 1)
    assert fix.strip(), line
    assert not (tmp_path / "p.pt").exists()


def test_existing_output_is_not_overwritten_without_force(tmp_path, base_ckpt):
    out = tmp_path / "p.pt"
    out.write_bytes(b"earlier result")
    line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", "--budget", "0.5", "--out", out, cwd=tmp_path))
    assert "already exists" in line and "--force" in line
    assert out.read_bytes() == b"earlier result"
    (tmp_path / "base.pt").write_bytes(b"keep me")
    _one_error_line(run_papm("train", "--dataset", "digits", "--out", "base.pt", cwd=tmp_path))
    assert (tmp_path / "base.pt").read_bytes() == b"keep me"


def test_checkpoint_and_dataset_class_count_mismatch(tmp_path, base_ckpt, digits):
    root = write_imagefolder_for_cli(tmp_path / "tree", digits)
    line = _one_error_line(run_papm("prune", base_ckpt, "--dataset", "imagefolder", "--data-root", root,
                                    "--classes", "1", "--budget", "0.5", cwd=tmp_path))
    assert "10 classes" in line and "3" in line


def test_invalid_option_values(tmp_path, base_ckpt):
    for extra, needle in ((["--criterion", "taylor"], "unknown criterion 'taylor'"), (["--alpha", "1.5"], "--alpha"),
                          (["--emphasis-mode", "x"], "emphasis mode"), (["--round-to", "0"], "--round-to")):
        line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", "--budget", "0.5", *extra, cwd=tmp_path))
        assert needle in line
    line = _one_error_line(run_papm("train", "--dataset", "digits", "--device", "tpu", "--out", "x.pt", cwd=tmp_path))
    assert "unknown device 'tpu'" in line


@pytest.mark.parametrize("args,needle", [
    (["prune", "x.pt", "--classes", "1", "--budget", "abc"], "--budget: expected a number, got 'abc'"),
    (["prune", "x.pt", "--budget", "0.5"], "required: --classes"),
    (["groups", "x.pt", "--k", "two"], "--k: invalid int value: 'two'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    line = _one_error_line(run_papm(*args, cwd=tmp_path))
    assert needle in line and "--help" in line


def test_checkpoint_with_damaged_metadata(tmp_path, base_ckpt):
    """A readable checkpoint whose metadata was damaged (hand-edited) is one line, not a traceback."""
    ckpt = torch.load(base_ckpt, weights_only=True)
    del ckpt["data"]["class_names"]
    torch.save(ckpt, tmp_path / "meta.pt")
    line = _one_error_line(run_papm("prune", "meta.pt", "--classes", "1", "--budget", "0.5", cwd=tmp_path))
    assert "meta.pt" in line and "damaged metadata" in line


def test_force_never_replaces_a_folder(tmp_path, base_ckpt):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier work")
    line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", "--budget", "0.5", "--out", "out", "--force",
                                    cwd=tmp_path))
    assert "is a folder" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier work"


def test_interrupted_train_resumes_from_its_last_epoch_and_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import papm.shared.training as training
    from papm.cli import main

    def train(out, *extra):
        return main(["train", "--dataset", "digits", "--width", "0.125", "--epochs", "3", "--quiet",
                     "--out", str(tmp_path / out), *extra])

    assert train("whole.pt") == 0 and not (tmp_path / "whole.pt.partial").exists()
    augment, steps = training.augment_with_flips, []

    def killed_in_epoch_3(*a, **k):  # 1,295 training images at batch 128: 11 steps an epoch
        steps.append(1)
        if len(steps) == 2 * 11 + 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a batch scheduler stops a job
        return augment(*a, **k)

    monkeypatch.setattr(training, "augment_with_flips", killed_in_epoch_3)
    capsys.readouterr()
    assert train("base.pt") == 130
    assert "interrupted after 2 of 3 epochs; run the same command again" in capsys.readouterr().err
    assert not (tmp_path / "base.pt").exists() and (tmp_path / "base.pt.partial").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone with it
    monkeypatch.setattr(training, "augment_with_flips", augment)
    assert train("base.pt", "--lr", "0.1") == 2  # another command is refused, its progress kept
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "started with lr=0.05 (this command: 0.1)" in err and "--force" in err and "\n" not in err
    partial = tmp_path / "base.pt.partial"  # saved on this CPU; made to say a GPU, as a run moved off one would
    saved = torch.load(partial, weights_only=True)
    assert saved["device"] == "cpu"
    torch.save({**saved, "device": "cuda:0"}, partial)
    assert train("base.pt") == 0
    out, err = capsys.readouterr()
    assert "resuming from" in out and not partial.exists()
    assert f"warning: {partial} was saved on cuda:0, this run goes on on cpu" in err and "not bit-identical" in err
    (whole, _, a), (resumed, _, b) = (load_checkpoint(tmp_path / f) for f in ("whole.pt", "base.pt"))
    assert a["meta"]["history"] == b["meta"]["history"] and len(b["meta"]["history"]) == 3
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


def test_train_progress_files_of_other_versions_or_not_papms_are_refused_and_kept(tmp_path, capsys):
    from papm.cli import main
    from papm.shared.checkpoint import TRAINING_STATE_FORMAT

    def train(out, *extra):
        return main(["train", "--dataset", "digits", "--width", "0.125", "--epochs", "1", "--quiet",
                     "--out", str(tmp_path / out), *extra])

    def one_line_error():
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    (tmp_path / "base.pt.partial").write_bytes(b"someone's notes")
    assert train("other.pt") == 0  # only --out's own progress file counts
    for extra in ((), ("--force",)):  # papm neither overwrites nor deletes a file it did not write
        assert train("base.pt", *extra) == 2 and "is not papm train's progress file" in one_line_error()
        assert (tmp_path / "base.pt.partial").read_bytes() == b"someone's notes" and not (tmp_path / "base.pt").exists()
    (tmp_path / "dir.pt.partial").mkdir()
    assert train("dir.pt", "--force") == 2 and "is a folder" in one_line_error()
    old = {"format": TRAINING_STATE_FORMAT, "version": 0, "command": {}, "state": {}}
    torch.save(old, tmp_path / "old.pt.partial")
    assert train("old.pt") == 2 and "written by another papm version" in one_line_error()
    assert train("old.pt", "--force") == 0 and not (tmp_path / "old.pt.partial").exists()  # papm's own: replaced


@pytest.mark.parametrize("cut, epochs_done", [(("--budget", "0.5", "--kd"), 1), (("--sparsity", "unstructured", "--budget", "0.6"), 0)],
                         ids=["channels-kd-in-epoch-2", "unstructured-in-epoch-1"])
def test_interrupted_prune_resumes_its_fine_tuning_and_ends_with_the_uninterrupted_model(tmp_path, base_ckpt, monkeypatch,
                                                                                         capsys, cut, epochs_done):
    import os
    import signal

    import papm.shared.checkpoint as checkpoint
    import papm.shared.training as training
    from papm.cli import main

    def prune(out, *extra):
        return main(["prune", str(base_ckpt), "--classes", "1,7", *cut, "--finetune-epochs", "3", "--quiet",
                     "--out", str(tmp_path / out), *extra])

    augment, save, calls, saves, armed = training.augment_with_flips, checkpoint.save_training_state, [], [], [False]

    def counted(*a, **k):  # one call per fine-tuning step (and per teacher view before the first epoch)
        calls.append(1)
        if armed[0] and len(saves) == epochs_done + 1 and len(calls) == saves[-1] + 3:  # three steps into the epoch
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a batch scheduler stops a job
        return augment(*a, **k)

    def marked(*a, **k):  # the cut, then every epoch
        saves.append(len(calls))
        return save(*a, **k)

    monkeypatch.setattr(training, "augment_with_flips", counted)
    monkeypatch.setattr(checkpoint, "save_training_state", marked)
    assert prune("whole.pt") == 0 and not (tmp_path / "whole.pt.partial").exists()
    assert len(saves) == 4  # the cut (after BatchNorm re-estimation, which draws augmented batches too), epochs 1-3
    epoch = saves[3] - saves[2]
    before_epoch_1 = saves[1] - saves[0] - epoch  # the teacher's outputs, computed by fit once before its loop
    calls.clear(), saves.clear()
    armed[0] = True
    capsys.readouterr()
    assert prune("pruned.pt") == 130
    assert f"interrupted after {epochs_done} of 3 fine-tuning epochs; run the same command again" in capsys.readouterr().err
    assert not (tmp_path / "pruned.pt").exists() and not (tmp_path / "pruned.json").exists()
    armed[0] = False
    assert prune("pruned.pt", "--finetune-lr", "0.05") == 2  # another command is refused, the progress kept
    err = capsys.readouterr().err.strip()
    assert "started with finetune_lr=0.02 (this command: 0.05)" in err and "--force" in err and "\n" not in err
    calls.clear()
    assert prune("pruned.pt") == 0
    out, err = capsys.readouterr()
    assert f"the cut is made, {epochs_done} of 3 fine-tuning epochs were done" in out
    assert "warning" not in err  # saved and resumed on this CPU
    assert len(calls) == before_epoch_1 + (3 - epochs_done) * epoch  # neither the cut nor a finished epoch again
    assert not (tmp_path / "pruned.pt.partial").exists()
    (whole, _, _), (resumed, _, _) = (load_checkpoint(tmp_path / f) for f in ("whole.pt", "pruned.pt"))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "pruned.json"))
    assert a["history"] == b["history"] and a["steps"] == b["steps"] and a["accuracy"] == b["accuracy"]
    assert b["nonzero_params"] == a["nonzero_params"] and b["kept_channels"] == a["kept_channels"]


def test_prune_refuses_a_papm_train_progress_file_at_its_out_and_force_starts_over(tmp_path, base_ckpt, capsys):
    from papm.cli import main
    from papm.shared.checkpoint import save_training_state

    save_training_state(tmp_path / "p.pt.partial", {"width": 0.25}, {"epoch": 1})  # an interrupted `papm train --out p.pt`
    args = ["prune", str(base_ckpt), "--classes", "1", "--budget", "0.5", "--finetune-epochs", "1", "--quiet",
            "--out", str(tmp_path / "p.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an interrupted papm train; finish it with that command, or pass --force" in err and "\n" not in err
    assert (tmp_path / "p.pt.partial").is_file()
    assert main([*args, "--force"]) == 0 and (tmp_path / "p.pt").is_file() and not (tmp_path / "p.pt.partial").exists()


def test_prune_resume_refuses_photos_that_changed_but_kept_their_count(tmp_path, monkeypatch, capsys):
    import os
    import shutil
    import signal

    import papm.shared.training as training
    from papm.cli import main

    root = write_pattern_folder(tmp_path / "photos", per_class=8, size=16)
    assert main(["train", "--dataset", "imagefolder", "--data-root", str(root), "--width", "0.125", "--epochs", "1",
                 "--quiet", "--out", str(tmp_path / "base.pt")]) == 0
    args = ["prune", str(tmp_path / "base.pt"), "--classes", "circle", "--budget", "0.5", "--finetune-epochs", "2",
            "--batch-size", "8", "--no-bn-recalibrate", "--quiet", "--out", str(tmp_path / "p.pt")]
    augment = training.augment_with_flips

    def stopped(*a, **k):  # the first fine-tuning step: the cut is saved by then
        os.kill(os.getpid(), signal.SIGTERM)
        return augment(*a, **k)

    monkeypatch.setattr(training, "augment_with_flips", stopped)
    assert main(args) == 130 and (tmp_path / "p.pt.partial").is_file()
    monkeypatch.setattr(training, "augment_with_flips", augment)
    first, second = sorted((root / "train" / "square").iterdir())[:2]
    shutil.copyfile(second, first)  # one photo replaced by another: the same count, other data
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "images_sha256=" in err and "--force" in err and "\n" not in err
    assert (tmp_path / "p.pt.partial").is_file() and not (tmp_path / "p.pt").exists()
    assert main([*args, "--force"]) == 0 and not (tmp_path / "p.pt.partial").exists()
