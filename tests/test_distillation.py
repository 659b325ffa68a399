"""Distillation from the base (``kd``): the teacher's logits are computed once per fit, one row per view
(upright, mirrored), and each step distils the view its images were trained on."""

import copy
import json
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from papm.shared.checkpoint import load_checkpoint
from papm.shared.datasets import normalise
from papm.shared.errors import PapmError
from papm.shared.models import ResNet18
from papm.shared.distillation import teacher_outputs
from papm.shared.training import TrainSettings, augment, augment_with_flips, fit

from conftest import TINY_WIDTH


def _kl(teacher, student, data, info):
    with torch.no_grad():
        t = teacher.eval()(normalise(data.x, info))
        s = student.eval()(normalise(data.x, info))
    return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean"))


def test_augment_reports_exactly_the_images_it_mirrored(digits):
    info = dataclasses.replace(digits.info, hflip=True, crop_padding=0)
    x = torch.randint(1, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out, flipped = augment_with_flips(x, info, torch.Generator().manual_seed(3))
    assert 10 < int(flipped.sum()) < 54
    for a, b, f in zip(x, out, flipped):
        assert torch.equal(b, a.flip(2) if f else a)
    # the same draws as augment: plain training runs keep their trajectories
    assert torch.equal(out, augment(x, info, torch.Generator().manual_seed(3)))
    _, never = augment_with_flips(x, digits.info, torch.Generator().manual_seed(3))  # digits: no flips
    assert not never.any()


def test_teacher_outputs_are_the_teachers_logits_of_each_view(digits, base_ckpt):
    teacher, info, _ = load_checkpoint(base_ckpt)
    flips = dataclasses.replace(info, hflip=True, crop_padding=0)
    x = digits.train.x[:100]
    out = teacher_outputs(teacher, x, flips, batch_size=32)  # batches that do not divide the data
    assert out.shape == (2, 100, info.num_classes) and out.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(out[0], teacher(normalise(x, info)), atol=1e-5)
        assert torch.allclose(out[1], teacher(normalise(x.flip(3), info)), atol=1e-5)
    assert teacher_outputs(teacher, x, info).shape == (1, 100, info.num_classes)  # digits: upright only
    # picked by each image's flip, they are the teacher's logits of the batch the student trains on
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(1))[:40]
    xb, flipped = augment_with_flips(x[idx], flips, torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(out[flipped.long(), idx], teacher(normalise(xb, info)), atol=1e-5)


def test_only_the_teacher_pass_runs_under_autocast(digits, base_ckpt, monkeypatch):
    # bf16 on CUDA speeds the teacher's pass; evaluation and class statistics stay plain fp32 (exact sums)
    from papm.shared import inference

    teacher, info, _ = load_checkpoint(base_ckpt)
    devices = []
    real = inference.autocast_for
    monkeypatch.setattr(inference, "autocast_for", lambda d: devices.append(torch.device(d)) or real(d))
    x = digits.train.x[:70]
    flips = dataclasses.replace(info, hflip=True, crop_padding=0)
    out = teacher_outputs(teacher, x, flips, batch_size=32)
    assert devices == [torch.device("cpu")] * 6  # 3 batches x 2 views, each under the device's autocast
    devices.clear()
    logits = inference.predict_logits(teacher, digits.train, info)
    assert devices == [] and torch.equal(logits[:70], out[0])  # on the CPU autocast is off: the same numbers
    with pytest.raises(ValueError, match="out has shape"):
        inference.logits_of(teacher, x, info, out=torch.empty(69, info.num_classes))


def test_distillation_pulls_the_student_towards_the_teacher(digits, base_ckpt):
    teacher, info, _ = load_checkpoint(base_ckpt)
    torch.manual_seed(5)
    student = ResNet18(info.num_classes, info.in_channels, TINY_WIDTH)
    plain = copy.deepcopy(student)
    settings = TrainSettings(epochs=6, lr=0.05, select_on_val=False)
    before = _kl(teacher, student, digits.val, info)
    # kd_weight=1: the labels play no part; the student learns the teacher's outputs alone
    fit(student, digits.train, info, settings, teacher=teacher, kd_weight=1.0, kd_temperature=1.0, progress=False)
    fit(plain, digits.train, info, settings, progress=False)
    after, without = _kl(teacher, student, digits.val, info), _kl(teacher, plain, digits.val, info)
    assert after < 0.4 * before and after < 0.5 * without  # measured: 1.41 -> 0.26, without kd 2.10
    # given precomputed (a node computes them once for all its jobs), the same run to the last bit
    torch.manual_seed(5)
    again = ResNet18(info.num_classes, info.in_channels, TINY_WIDTH)
    fit(again, digits.train, info, settings, teacher_logits=teacher_outputs(teacher, digits.train.x, info),
        kd_weight=1.0, kd_temperature=1.0, progress=False)
    for a, b in zip(student.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_teacher_logits_of_other_data_are_refused(digits, base_ckpt):
    teacher, info, _ = load_checkpoint(base_ckpt)
    student = ResNet18(info.num_classes, info.in_channels, TINY_WIDTH)
    wrong = teacher_outputs(teacher, digits.train.x[:50], info)
    with pytest.raises(PapmError, match="teacher logits of shape"):
        fit(student, digits.train, info, TrainSettings(epochs=1), teacher_logits=wrong, progress=False)


def test_a_federated_run_distils_with_one_teacher_pass_per_node_and_round(tmp_path, monkeypatch):
    """kd=true in a run: every node computes the base's logits once per fine-tuning round for all its jobs
    (two groups' models here), and the distillation changes what the specialists learn."""
    from papm.client import client_app
    from papm.shared.config import RunConfig
    from papm.simulations.direct import run_direct

    small = ["nodes=2", "devices=2", "base-rounds=2", "base-epochs=1", "finetune-epochs=1", "finetune-rounds=2",
             "fusion-rounds=1", "device=cpu"]
    passes, weights = [], set()
    real, finetune_local = client_app.teacher_outputs, client_app.finetune_local
    monkeypatch.setattr(client_app, "teacher_outputs", lambda *a, **k: passes.append(len(a[1])) or real(*a, **k))
    monkeypatch.setattr(client_app, "finetune_local",
                        lambda *a, **k: weights.add((k["kd_weight"], k["kd_temperature"])) or finetune_local(*a, **k))
    run_direct(RunConfig.from_overrides([*small, "kd=true", "kd-weight=0.7", "kd-temperature=2",
                                         f"run-dir={tmp_path / 'kd'}"]))
    assert weights == {(0.7, 2.0)}  # the run's kd-weight and kd-temperature reach every node's fine-tuning
    run_direct(RunConfig.from_overrides([*small, f"run-dir={tmp_path / 'plain'}"]))
    assert len(passes) == 2 * 2  # two nodes, two rounds; not once per job
    kd, plain = (json.loads((tmp_path / r / "evaluation.json").read_text()) for r in ("kd", "plain"))
    assert passes[:2] == passes[2:] and min(passes) > 0  # each node's own training images, every round
    assert [d["test_accuracy"] for d in kd["devices"]] != [d["test_accuracy"] for d in plain["devices"]]
