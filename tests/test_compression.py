"""Compression options of `papm prune` (issue: compression breadth): the iterative schedule, BatchNorm
re-estimation after surgery, and one clear line per bad combination."""

import csv
import json

import pytest
import torch

import papm.shared.prune_pipeline as pipeline_mod
from papm.shared.checkpoint import load_checkpoint
from papm.shared.models import count_params
from papm.shared.prune_pipeline import specialise
from papm.shared.specialise import PruneSettings, step_targets
from papm.shared.training import TrainSettings

from conftest import run_papm
from test_cli import _one_error_line


def _settings(**kw):
    return PruneSettings(budget=0.77, finetune=TrainSettings(epochs=0, batch_size=64), **kw)


def test_iterative_pruning_reaches_the_budget_in_steps_with_apoz_remeasured(digits, base_ckpt, monkeypatch):
    base, info, ckpt = load_checkpoint(base_ckpt)
    measured = []  # parameter count of the model APoZ was measured on, per cut
    real = pipeline_mod.count_zero_activations

    def spy(model, *a, **k):
        measured.append(count_params(model))
        return real(model, *a, **k)

    monkeypatch.setattr(pipeline_mod, "count_zero_activations", spy)
    model, args, report = specialise(base, ckpt["model_args"], digits, [3, 5, 8],
                                     _settings(schedule="iterative", steps=3, step_epochs=0), progress=False)
    one_shot = specialise(base, ckpt["model_args"], digits, [3, 5, 8], _settings(), progress=False)[2]
    assert abs(report["reduction"] - 0.77) <= 0.01 and abs(report["reduction"] - one_shot["reduction"]) <= 0.01
    assert count_params(model) == report["params_after"] == report["steps"][-1]["params"]
    params = [row["params"] for row in report["steps"]]
    assert len(params) == 3 and params[0] > params[1] > params[2]
    # every cut after the first scored the already-pruned model, not the base again
    assert measured[:3] == [report["params_before"], params[0], params[1]]
    # the geometric schedule: each cut keeps about the same share of what is left
    targets = step_targets(report["params_before"], 0.77, 3)
    assert all(abs(p - t) / report["params_before"] <= 0.01 for p, t in zip(params, targets))


def test_bn_recalibration_changes_running_statistics_and_no_weight(digits, base_ckpt):
    base, info, ckpt = load_checkpoint(base_ckpt)
    with_bn, _, r1 = specialise(base, ckpt["model_args"], digits, [0, 1], _settings(bn_recalibrate=True), progress=False)
    without, _, r0 = specialise(base, ckpt["model_args"], digits, [0, 1], _settings(bn_recalibrate=False), progress=False)
    sa, sb = with_bn.state_dict(), without.state_dict()
    stats = [k for k in sa if k.endswith(("running_mean", "running_var"))]
    weights = [k for k, _ in with_bn.named_parameters()]
    assert stats and all(torch.equal(sa[k], sb[k]) for k in weights)
    assert sum(not torch.allclose(sa[k], sb[k]) for k in stats) >= len(stats) // 2
    # the report says what re-estimation did: accuracy after the cut, then after re-estimation
    assert "after_bn_recalibrate" in r1["accuracy"] and "after_bn_recalibrate" not in r0["accuracy"]
    assert r1["accuracy"]["before_finetune"] == r0["accuracy"]["before_finetune"]
    assert r1["accuracy"]["after_bn_recalibrate"] == r1["accuracy"]["after_finetune"]  # no fine-tuning here


def test_papm_prune_iterative_writes_one_csv_row_per_step(tmp_path, base_ckpt):
    r = run_papm("prune", base_ckpt, "--classes", "3,5,8", "--budget", "0.6", "--schedule", "iterative", "--steps", "2",
                 "--step-epochs", "1", "--finetune-epochs", "1", "--out", "p.pt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.steps.csv")))
    report = json.loads((tmp_path / "p.json").read_text())
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert int(rows[-1]["params"]) == report["params_after"] and float(rows[-1]["reduction"]) == report["reduction"]
    assert rows[0]["after_step_finetune_group"] and not rows[1]["after_step_finetune_group"]  # no step fine-tune after the last cut
    assert float(rows[1]["after_finetune_all"]) == report["accuracy"]["after_finetune"]["all"]


def test_papm_prune_reports_onnx_latency_and_says_what_sparsity_does_not_speed_up(tmp_path, base_ckpt):
    notes = {}
    for name, flags in (("cut", ["--budget", "0.77"]), ("sparse", ["--sparsity", "2:4"]),
                        ("bits", ["--budget", "0.5", "--weight-bits", "4"])):
        r = run_papm("prune", base_ckpt, "--classes", "3,5,8", *flags, "--finetune-epochs", "0", "--out", f"{name}.pt",
                     "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / f"{name}.json").read_text())
        lat = report["latency"]
        assert lat["base_ms"] > 0 and lat["pruned_ms"] > 0 and "ONNX Runtime" in lat["measured"]
        assert "latency (ONNX Runtime" in r.stdout
        notes[name] = report["dense_runtime_note"]
    assert notes["cut"] is None  # a channel cut is a smaller dense model: its latency says it all
    assert "2:4 sparsity" in notes["sparse"] and "no faster" in notes["sparse"]
    assert "4-bit weights are evaluated in PyTorch" in notes["bits"]


def test_bad_schedule_options_are_one_line(tmp_path, base_ckpt):
    for extra, needle in ((["--schedule", "cyclic"], "unknown schedule 'cyclic'"),
                          (["--steps", "3"], "--steps 3 needs --schedule iterative"),
                          (["--schedule", "iterative", "--steps", "1"], "schedule iterative needs steps >= 2"),
                          (["--schedule", "iterative", "--step-epochs", "-1"], "step-epochs must be >= 0")):
        line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", "--budget", "0.5", *extra, cwd=tmp_path))
        assert needle in line


def test_two_four_sparsity_survives_fine_tuning(digits, base_ckpt):
    base, info, ckpt = load_checkpoint(base_ckpt)
    settings = PruneSettings(budget=None, sparsity="2:4", finetune=TrainSettings(epochs=1, batch_size=64))
    model, _, report = specialise(base, ckpt["model_args"], digits, [3, 5, 8], settings, progress=False)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.in_channels % 4 == 0:
            groups = m.weight.detach().permute(0, 2, 3, 1).reshape(-1, 4)  # 4 consecutive input channels
            assert ((groups != 0).sum(dim=1) == 2).all(), name
            checked += 1
    assert checked >= 10 and report["nonzero_params"] < 0.6 * report["params_before"]
    assert report["history"]  # it was fine-tuned, and the zeros stayed zeros


def test_unstructured_sparsity_zeroes_the_budget_and_reports_size(digits, base_ckpt):
    base, info, ckpt = load_checkpoint(base_ckpt)
    settings = PruneSettings(budget=0.8, sparsity="unstructured", finetune=TrainSettings(epochs=1, batch_size=64))
    model, _, report = specialise(base, ckpt["model_args"], digits, [3, 5, 8], settings, progress=False)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in convs)
    assert abs(zeros / sum(w.numel() for w in convs) - 0.8) < 0.01
    assert report["params_after"] == count_params(model)  # shapes stay
    assert report["size"]["compressed_bytes"] < 0.6 * report["size"]["dense_bytes"]


def test_low_bit_weights_take_at_most_two_to_the_bits_values(digits, base_ckpt):
    from papm.shared.lowbit import distinct_values_per_channel

    base, info, ckpt = load_checkpoint(base_ckpt)
    for bits, quant in ((3, "rtn"), (4, "gptq")):
        settings = PruneSettings(budget=0.5, weight_bits=bits, weight_quant=quant, finetune=TrainSettings(epochs=0))
        model, _, report = specialise(base, ckpt["model_args"], digits, [3, 5, 8], settings, progress=False)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                assert distinct_values_per_channel(m.weight) <= 2 ** bits
        assert report["weights"]["weight_bits"] == bits and "after_weight_quant" in report["accuracy"]


class _NoData:
    """A training split that may not be touched: data-free compression reads no image of it."""

    def __getattr__(self, name):
        raise AssertionError(f"data-free compression read the training data ({name})")

    def __len__(self):
        raise AssertionError("data-free compression read the training data")


def test_data_free_compression_reads_no_training_data(digits, base_ckpt):
    from papm.shared.datasets import DataSplits

    base, info, ckpt = load_checkpoint(base_ckpt)
    splits = DataSplits(info=digits.info, train=_NoData(), val=_NoData(), test=digits.test)
    settings = PruneSettings(budget=0.3, criterion="l1", data_free=True, bn_recalibrate=False, weight_bits=8,
                             finetune=TrainSettings(epochs=0))
    model, args, report = specialise(base, ckpt["model_args"], splits, [3, 5, 8], settings, progress=False)
    assert abs(report["reduction"] - 0.3) <= 0.01 and report["data_free"] and not report["history"]


def test_bad_compression_combinations_are_one_line(tmp_path, base_ckpt):
    cases = ((["--budget", "0.5", "--data-free", "--criterion", "apoz"], "criterion apoz needs activations"),
             (["--budget", "0.5", "--data-free", "--finetune-epochs", "2"], "cannot fine-tune"),
             (["--budget", "0.5", "--data-free", "--weight-bits", "4", "--weight-quant", "gptq"], "use weight-quant rtn"),
             (["--sparsity", "2:4", "--budget", "0.5"], "drop --budget"),
             (["--sparsity", "dense", "--budget", "0.5"], "unknown sparsity 'dense'"),
             (["--budget", "0.5", "--sparsity", "unstructured", "--schedule", "iterative"], "does not combine"),
             (["--level", "3", "--budget", "0.5"], "--level 3 sets the sparsity"),
             (["--level", "9"], "level must be 1..5"),
             (["--budget", "0.5", "--weight-bits", "1"], "weight-bits must be one of"),
             ([], "--budget is required"))
    for extra, needle in cases:
        line = _one_error_line(run_papm("prune", base_ckpt, "--classes", "1", *extra, cwd=tmp_path))
        assert needle in line, (extra, line)


# ---- the same options in a federated run (direct engine: the ServerApp phases and ClientApp handlers in one process)

from papm.client.client_app import app as client_app  # noqa: E402
from papm.shared.config import RunConfig  # noqa: E402
from papm.simulations.direct import run_direct  # noqa: E402

FED = ["nodes=2", "devices=2", "base-rounds=2", "base-epochs=1", "finetune-epochs=1", "finetune-rounds=2",
       "fusion-rounds=1", "device=cpu"]


def _metrics(run, phase):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["phase"] == phase]


def test_federated_iterative_schedule_resumes_between_cuts_and_ends_where_an_uninterrupted_run_does(tmp_path):
    from papm.shared.lowbit import distinct_values_per_channel

    sets = [*FED, "schedule=iterative", "steps=2", "step-epochs=1", "weight-bits=4"]
    whole = tmp_path / "whole"
    run_direct(RunConfig.from_overrides([*sets, f"run-dir={whole}"]))
    seen = []

    def killer(msg, context):  # dies when the second cut asks for APoZ of the groups' own (once-cut) models
        if msg.metadata.message_type == "query.apoz":
            own = json.loads(msg.content["papm"]["jobs"])[0].get("own-model")
            seen.append(own)
            if own:
                raise KeyboardInterrupt("killed before the second cut")
        return client_app(msg, context)

    killed = tmp_path / "killed"
    cfg = RunConfig.from_overrides([*sets, f"run-dir={killed}"])
    with pytest.raises(KeyboardInterrupt):
        run_direct(cfg, app=killer)
    assert seen[0] is False and seen[-1] is True  # cut 1 measured the base, cut 2 each group's cut model
    seen.clear()

    def spy(msg, context):
        if msg.metadata.message_type == "query.apoz":
            seen.append(json.loads(msg.content["papm"]["jobs"])[0].get("own-model"))
        return client_app(msg, context)

    run_direct(cfg, resume=True, app=spy)
    assert seen == [True, True]  # one APoZ query per node, of the cut models: the resumed run did not cut the base again
    a, b = (json.loads((r / "evaluation.json").read_text()) for r in (whole, killed))
    assert (a["base"]["accuracy"], a["fusion"]["accuracy"]) == (b["base"]["accuracy"], b["fusion"]["accuracy"])
    assert [m["round"] for m in _metrics(killed, "prune")] == [1, 1, 2, 2]  # two groups, two cuts, each once
    assert [m["round"] for m in _metrics(killed, "prune-recovery")] == [1, 1]  # the recovery between the cuts, once
    assert [m["round"] for m in _metrics(killed, "prune-bn")] == [2, 2]  # BatchNorm after the last cut, once
    steps = list(csv.DictReader(open(killed / "devices" / "device-0" / "prune_steps.csv")))
    assert [int(r["step"]) for r in steps] == [1, 2] and steps[0]["after_recovery_group"] and steps[1]["final_group"]
    assert steps[1]["after_bn_group"] and not steps[0]["after_bn_group"]
    assert int(steps[0]["params"]) > int(steps[1]["params"])
    for g in range(2):
        report = json.loads((killed / "devices" / f"device-{g}" / "prune.json").read_text())
        assert report["cuts"] == 2 and abs(report["reduction"] - 0.77) <= 0.01
        model, _, _ = load_checkpoint(killed / "devices" / f"device-{g}" / "pruned.pt")
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                assert distinct_values_per_channel(m.weight) <= 2 ** 4


def test_federated_cut_reports_accuracy_before_and_after_batchnorm_reestimation_which_leaves_the_weights_alone(tmp_path):
    runs = {}
    for recalibrate in (True, False):
        runs[recalibrate] = tmp_path / f"bn-{recalibrate}"
        run_direct(RunConfig.from_overrides([*FED, f"bn-recalibrate={str(recalibrate).lower()}", f"run-dir={runs[recalibrate]}"]))
    assert [m["device"] for m in _metrics(runs[True], "prune-bn")] == [0, 1] and not _metrics(runs[False], "prune-bn")
    assert [(m["round"], m["device"]) for m in _metrics(runs[True], "finetune-test")] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    summary = (runs[True] / "summary.md").read_text()  # the same numbers, as a table a user reads after the run
    table = summary.split("## Fine-tuning")[1].split("##")[0]
    on0 = json.loads((runs[True] / "devices" / "device-0" / "prune.json").read_text())
    assert f"| round 2 | {100 * on0['test_accuracy_per_round'][1]['group']:.2f}% |" in table
    assert "| the cut (BatchNorm re-estimated) |" in table and "| the end (as shipped) |" in table
    for g in range(2):
        on, off = (json.loads((runs[r] / "devices" / f"device-{g}" / "prune.json").read_text()) for r in (True, False))
        assert on["bn_recalibrate"] is True and off["bn_recalibrate"] is False and on["level"] == 0
        # the same cut, measured as cut and with exact BatchNorm statistics of the cut model
        assert on["test_accuracy_after_cut"] == off["test_accuracy_after_cut"]
        assert on["test_accuracy_after_bn_recalibrate"] != on["test_accuracy_after_cut"]
        assert off["test_accuracy_after_bn_recalibrate"] is None
        row = list(csv.DictReader(open(runs[True] / "devices" / f"device-{g}" / "prune_steps.csv")))[-1]
        assert float(row["after_bn_group"]) == on["test_accuracy_after_bn_recalibrate"]["group"]
        # the server's test accuracy after every fine-tuning round; with nothing after the last round (no BatchNorm
        # re-estimation, no weight rounding) the last one is the shipped model's
        assert [r["round"] for r in on["test_accuracy_per_round"]] == [1, 2] == [r["round"] for r in off["test_accuracy_per_round"]]
        assert off["test_accuracy_per_round"][-1]["group"] == off["test_accuracy"]["group"]
        assert off["test_accuracy_per_round"][-1]["all"] == off["test_accuracy"]["all"]
        # fine-tuning trains in train mode (batch statistics): the learned weights are the same with or without
        # the re-estimation; only the running statistics differ
        a, b = (load_checkpoint(runs[r] / "devices" / f"device-{g}" / "pruned.pt")[0].state_dict() for r in (True, False))
        for name in a:
            if name.endswith(("running_mean", "running_var")):
                continue
            assert torch.equal(a[name], b[name]), name
        assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith("running_var"))


def test_federated_two_four_sparsity_stays_through_fedavg_fine_tuning(tmp_path):
    run = tmp_path / "run"
    run_direct(RunConfig.from_overrides([*FED, "sparsity=2:4", f"run-dir={run}"]))
    for g in range(2):
        model, _, _ = load_checkpoint(run / "devices" / f"device-{g}" / "pruned.pt")
        base, _, _ = load_checkpoint(run / "base.pt")
        checked = 0
        for (name, m), b in zip(model.named_modules(), base.modules()):
            if isinstance(m, torch.nn.Conv2d) and m.in_channels % 4 == 0:
                groups = m.weight.detach().permute(0, 2, 3, 1).reshape(-1, 4)
                assert ((groups != 0).sum(dim=1) == 2).all(), name
                assert not torch.equal(m.weight, b.weight * (m.weight != 0))  # fine-tuned, not only masked
                checked += 1
        assert checked >= 10
        report = json.loads((run / "devices" / f"device-{g}" / "prune.json").read_text())
        assert report["sparsity"] == "2:4" and report["size"]["nonzero_params"] < 0.6 * report["params_after"]


def test_bad_federated_compression_keys_are_one_line(tmp_path):
    for sets, needle in ((["data-free=true"], "criterion papm needs activations"),
                         (["level=2", "weight-bits=4"], "level 2 sets sparsity and weight-bits"),
                         (["schedule=iterative", "steps=1"], "schedule iterative needs steps >= 2"),
                         (["sparsity=2:4", "schedule=iterative"], "does not combine")):
        line = _one_error_line(run_papm("simulate", *[x for s in sets for x in ("--set", s)], "--run-dir", "r", cwd=tmp_path))
        assert needle in line, (sets, line)
    assert not (tmp_path / "r").exists()


def test_readme_level_table_is_the_ladder_in_the_code():
    from pathlib import Path

    from papm.shared.compression_options import level_table

    assert level_table() in (Path(__file__).parents[1] / "README.md").read_text()


def test_federated_gptq_equals_gptq_on_all_the_nodes_calibration_images_in_one_place(tmp_path):
    """weight-quant=gptq: one exchange per layer, the nodes' X^T X summed on the server; the quantised models
    are those of centralised GPTQ on the union of the images the nodes calibrated on."""
    import copy

    from papm.client.client_app import Node
    from papm.shared.datasets import normalise
    from papm.shared.lowbit import distinct_values_per_channel, gptq_layer_order, quantize_gptq

    first = {}  # group -> the fine-tuned model as the first GPTQ exchange carried it
    calib = {}  # (group, partition id) -> the images that node calibrated on
    layers = []

    def spy(msg, context):
        if msg.metadata.message_type == "query.gptq_inputs":
            node = Node(msg, context)
            for job in node.jobs():
                g = int(job["key"].split("-")[1])
                layers.append(job["layer"]) if g == 0 and node.partition_id == 0 else None
                first.setdefault(g, node.model(job["key"]))
                images = node.data.train.of_classes(job["classes"]).sample(node.cfg.calib_samples, node.cfg.seed + node.partition_id)
                calib[(g, node.partition_id)] = normalise(images.x, node.info())
        return client_app(msg, context)

    run = tmp_path / "run"
    run_direct(RunConfig.from_overrides([*FED, "weight-bits=4", "weight-quant=gptq", "calib-samples=64", f"run-dir={run}"]),
               app=spy)
    for g in range(2):
        fed, _, _ = load_checkpoint(run / "devices" / f"device-{g}" / "pruned.pt")
        central = copy.deepcopy(first[g])
        example = calib[(g, 0)][:1]
        if g == 0:
            assert layers == gptq_layer_order(central, example)  # one exchange per layer, in forward order
        images = torch.cat([calib[(g, p)] for p in range(2)])
        assert 0 < len(images) <= 2 * 64
        quantize_gptq(central, 4, images, batch_size=64)
        for (name, a), b in zip(fed.named_modules(), central.modules()):
            if isinstance(a, (torch.nn.Conv2d, torch.nn.Linear)):
                assert distinct_values_per_channel(a.weight) <= 2 ** 4
                # the same sums up to float addition order (bit for bit here): at most a rare rounding tie apart
                assert (a.weight != b.weight).float().mean() <= 0.001, name
                assert torch.allclose(a.weight, b.weight, atol=a.weight.abs().max().item() / 7), name
        report = json.loads((run / "devices" / f"device-{g}" / "prune.json").read_text())
        assert report["weights"]["weight_quant"] == "gptq" and report["weights"]["calibration_samples"] == len(images)
    summary = (run / "summary.md").read_text()
    assert "4-bit weights (gptq)" in summary


def test_gptq_is_refused_where_it_has_no_images_or_a_level_sets_the_rounding(tmp_path):
    for sets, needle in ((["weight-quant=gptq"], "give weight-bits"),
                         (["data-free=true", "criterion=l1", "weight-bits=4", "weight-quant=gptq", "finetune-epochs=0"],
                          "use weight-quant rtn"),
                         (["level=3", "weight-quant=gptq"], "level 3 sets sparsity and weight-bits")):
        line = _one_error_line(run_papm("simulate", *[x for s in sets for x in ("--set", s)], "--run-dir", "r", cwd=tmp_path))
        assert needle in line, (sets, line)
    assert not (tmp_path / "r").exists()
