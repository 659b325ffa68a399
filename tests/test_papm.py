"""APoZ counting, the PAPM criterion, and pruning to a parameter budget."""

import copy

import pytest
import torch
import torch.nn.functional as F

from papm.shared import prune_pipeline as pipeline_mod
from papm.shared.datasets import normalise
from papm.shared.errors import PapmError
from papm.shared.importance import ActivationCounts, PAPMImportance, count_zero_activations, make_importance
from papm.shared.models import ResNet18, build_model, count_params, model_args, params_for_channels
from papm.shared.pruning import prune_to_budget, score_groups
from papm.shared.prune_pipeline import specialise
from papm.shared.specialise import PruneSettings, prune_model
from papm.shared.training import TrainSettings


def randomised_model(width=0.125, seed=0):
    """A tiny ResNet with random BN statistics, so ReLUs zero a varied share of each channel."""
    torch.manual_seed(seed)
    model = ResNet18(10, 1, width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def hand_counts(model, x):
    """Zeros per channel after each ReLU, by an explicit forward pass (no hooks)."""
    zeros, elems = {}, {}

    def note(name, a):
        zeros[name] = zeros.get(name, 0) + (a == 0).sum(dim=(0, 2, 3))
        elems[name] = elems.get(name, 0) + a.shape[0] * a.shape[2] * a.shape[3]

    h = F.relu(model.bn1(model.conv1(x)))
    note("conv1", h)
    for s in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{s}")):
            a = F.relu(block.bn1(block.conv1(h)))
            note(f"layer{s}.{b}.conv1", a)
            h = F.relu(block.bn2(block.conv2(a)) + block.shortcut(h))
            note(f"layer{s}.{b}.conv2", h)
    return zeros, elems


def test_apoz_hooks_equal_a_hand_count(digits):
    model = randomised_model()
    data = digits.train.subset(range(100))
    counts = count_zero_activations(model, data, digits.info, batch_size=32)
    zeros, elems = hand_counts(model, normalise(data.x, digits.info))
    assert set(counts.zeros) == set(zeros)
    for name in zeros:
        assert torch.equal(counts.zeros[name], zeros[name].to(torch.int64)), name
        assert counts.elements[name] == elems[name]
    apoz = counts.apoz()["conv1"]
    assert 0.0 < float(apoz.mean()) < 1.0  # the test is not vacuous


def test_apoz_counts_of_two_shards_add_up_to_the_whole(digits):
    model = randomised_model()
    whole = digits.train.subset(range(300))
    a = count_zero_activations(model, whole.subset(range(0, 130)), digits.info)
    b = count_zero_activations(model, whole.subset(range(130, 300)), digits.info)
    total = count_zero_activations(model, whole, digits.info)
    summed = a + b
    for name in total.zeros:
        assert torch.equal(summed.zeros[name], total.zeros[name])
        assert summed.elements[name] == total.elements[name]
    # the record form round-trips exactly
    again = ActivationCounts.from_arrays(summed.to_arrays())
    assert all(torch.equal(again.zeros[k], summed.zeros[k]) for k in summed.zeros)


def _singleton_groups(model, importance):
    """Scores of the groups that hold exactly one conv (each block's conv1)."""
    _, groups = score_groups(model, torch.zeros(1, 1, 8, 8), importance)
    return {g.convs[0]: g.scores for g in groups if len(g.convs) == 1}


def test_papm_alpha_one_ranks_like_l2_and_alpha_zero_like_one_minus_apoz(digits):
    model = randomised_model()
    counts = count_zero_activations(model, digits.train.subset(range(200)), digits.info)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    apoz = counts.apoz()
    l2 = _singleton_groups(model, PAPMImportance(apoz, names, alpha=1.0))
    act = _singleton_groups(model, PAPMImportance(apoz, names, alpha=0.0))
    mix = _singleton_groups(model, PAPMImportance(apoz, names, alpha=0.5))
    assert len(l2) == 8  # every block's conv1
    for conv, scores in l2.items():
        norms = modules[conv].weight.detach().flatten(1).norm(dim=1)
        assert torch.equal(torch.argsort(scores, stable=True), torch.argsort(norms, stable=True)), conv
        torch.testing.assert_close(scores, (norms / norms.max()).float())
        expected_act = (1 - apoz[conv]).float()
        torch.testing.assert_close(act[conv], expected_act)
        torch.testing.assert_close(mix[conv], 0.5 * scores + 0.5 * expected_act)


TARGET = "layer4.0.conv1"  # a conv of its own (no residual coupling), 128 channels at width 0.25
HIGH_APOZ = [7, 100, 31, 64, 2, 90, 45, 13, 120, 77, 58, 26]  # most zeros first
LOW_NORM = [5, 99, 40, 17, 127, 60, 84, 3, 111, 33, 70, 21]  # smallest norm first


def controlled_model_and_counts():
    """Width 0.25, every filter of unit L2 norm and no zero activations, except in TARGET: the
    HIGH_APOZ channels are zero 99%, 98%, ... of the time and the LOW_NORM filters have norms 0.01, 0.02, ..."""
    torch.manual_seed(0)
    model = ResNet18(10, 1, 0.25).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight /= m.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        w = dict(model.named_modules())[TARGET].weight
        for rank, c in enumerate(LOW_NORM):
            w[c] *= 0.01 * (rank + 1)
    sizes = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    zeros = {conv: torch.zeros(sizes[conv], dtype=torch.int64) for conv in model.activation_sites().values()}
    for rank, c in enumerate(HIGH_APOZ):
        zeros[TARGET][c] = 990 - 10 * rank
    return model, ActivationCounts(zeros, {conv: 1000 for conv in zeros})


def budget_removing(args, conv, n):
    """The budget that removes exactly ``n`` output channels of ``conv`` (a hair under it)."""
    before = params_for_channels(args)
    after = params_for_channels({**args, "channels": {**args["channels"], conv: args["channels"][conv] - n}})
    return (before - after) / before - 1e-9


@pytest.mark.parametrize("criterion,alpha,expected", [
    ("papm", 0.0, HIGH_APOZ),  # alpha 0: the channels that are most often zero go first
    ("apoz", 0.5, HIGH_APOZ),  # the apoz criterion ignores alpha
    ("papm", 1.0, LOW_NORM),  # alpha 1: the smallest filters go first, whatever their APoZ
])
def test_papm_removes_high_apoz_or_low_norm_channels_first(digits, criterion, alpha, expected):
    model, counts = controlled_model_and_counts()
    args = model_args(10, 1, 0.25)
    settings = PruneSettings(budget=budget_removing(args, TARGET, 6), criterion=criterion, alpha=alpha)
    result, pruned_args = prune_model(model, args, digits.info, settings, counts)
    dropped = set(range(128)) - set(result.kept[TARGET])
    assert dropped == set(expected[:6])  # the six worst, in the criterion's order
    # nothing else was touched
    assert {k: v for k, v in pruned_args["channels"].items() if k != TARGET} == {k: v for k, v in args["channels"].items() if k != TARGET}
    assert pruned_args["channels"][TARGET] == 122 == model.layer4[0].conv1.out_channels


def test_papm_with_both_terms_drops_a_channel_that_is_both_mostly_zero_and_small_first(digits):
    model, counts = controlled_model_and_counts()
    both = 50  # in neither list: make it the 7th most zero and the 7th smallest
    with torch.no_grad():
        model.layer4[0].conv1.weight[both] *= 0.065
    counts.zeros[TARGET][both] = 925
    args = model_args(10, 1, 0.25)
    result, _ = prune_model(model, args, digits.info, PruneSettings(budget=budget_removing(args, TARGET, 1), alpha=0.5), counts)
    assert set(range(128)) - set(result.kept[TARGET]) == {both}


def test_round_to_with_coupled_residual_channels(digits):
    """--round-to 8: every kept count is a multiple of 8, the channels tied by residual additions
    (the stem and the block outputs of stage 1; the block outputs and shortcut of later stages)
    keep equal counts and the same channels, and the pruned model runs and rebuilds."""
    model = randomised_model(width=0.25)
    base = copy.deepcopy(model)
    args = model_args(10, 1, 0.25)
    counts = count_zero_activations(model, digits.train.subset(range(200)), digits.info)
    _, groups = score_groups(model, torch.zeros(1, 1, 8, 8), make_importance("papm", model, counts))
    coupled = [["conv1", "layer1.0.conv2", "layer1.1.conv2"]] + [
        [f"layer{s}.0.conv2", f"layer{s}.0.shortcut.0", f"layer{s}.1.conv2"] for s in (2, 3, 4)]
    assert sorted(g.convs for g in groups if len(g.convs) > 1) == sorted(coupled)
    assert all(len(g.scores) == args["channels"][g.convs[0]] for g in groups)  # one score per coupled channel

    result, pruned = prune_model(model, args, digits.info, PruneSettings(budget=0.6, round_to=8), counts)
    ch = pruned["channels"]
    assert all(c % 8 == 0 and c >= 8 for c in ch.values()), ch
    assert abs(result.reduction - 0.6) <= 0.01
    for convs in coupled:
        assert len({ch[c] for c in convs}) == 1, (convs, ch)
        assert all(result.kept[c] == result.kept[convs[0]] for c in convs), convs
    assert any(ch[c[0]] < args["channels"][c[0]] for c in coupled)  # coupled channels were really removed
    assert ch == {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.randn(4, 1, 8, 8)
    rebuilt = build_model(pruned).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert rebuilt(x).shape == (4, 10)
    # the coupled channels kept are the same base channels in every member
    kept = result.kept["layer2.0.conv2"]
    assert torch.equal(model.layer2[0].shortcut[0].weight, base.layer2[0].shortcut[0].weight[kept][:, result.kept["layer1.1.conv2"]])


@pytest.mark.parametrize("criterion", ["papm", "l1", "apoz", "random"])
@pytest.mark.parametrize("budget", [0.3, 0.77, 0.9])
def test_pruned_model_meets_budget_within_one_point(digits, criterion, budget):
    model = randomised_model(width=0.25)
    args = model_args(10, 1, 0.25)
    counts = count_zero_activations(model, digits.train.subset(range(200)), digits.info)
    before = count_params(model)
    result = prune_to_budget(model, args, torch.zeros(1, 1, 8, 8), make_importance(criterion, model, counts), budget)
    after = count_params(model)
    assert result.params_before == before and result.params_after == after
    assert abs((1 - after / before) - budget) <= 0.01
    assert min(result.channels.values()) >= 1
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    rebuilt = build_model(model_args(10, 1, 0.25, result.channels))
    rebuilt.load_state_dict(model.state_dict())  # the plan alone rebuilds the architecture


def test_round_to_keeps_multiples(digits):
    model = randomised_model(width=0.25)
    result = prune_to_budget(model, model_args(10, 1, 0.25), torch.zeros(1, 1, 8, 8), make_importance("l1", model), 0.6, round_to=4)
    assert all(c % 4 == 0 for c in result.channels.values()), result.channels
    assert abs(result.reduction - 0.6) <= 0.01


def test_budget_that_cannot_be_met_is_a_clear_error():
    model = randomised_model()
    with pytest.raises(PapmError, match="cannot be met"):
        prune_to_budget(model, model_args(10, 1, 0.125), torch.zeros(1, 1, 8, 8), make_importance("l1", model), 0.9999)


def test_pruned_weights_are_the_base_weights(digits):
    base = randomised_model(width=0.25)
    model = copy.deepcopy(base)
    result, _ = prune_model(model, model_args(10, 1, 0.25), digits.info, PruneSettings(budget=0.6, criterion="l1"), None)
    kept = result.kept
    assert len(kept["layer2.0.conv1"]) < 32  # this layer was really pruned
    sub = base.layer2[0].conv1.weight[kept["layer2.0.conv1"]][:, kept["layer1.1.conv2"]]
    assert torch.equal(model.layer2[0].conv1.weight, sub)
    sub_fc = base.fc.weight[:, kept["layer4.1.conv2"]]
    assert torch.equal(model.fc.weight, sub_fc)


def test_finetuning_starts_from_the_base_weights(digits, monkeypatch):
    base = randomised_model(width=0.25)
    seen = {}
    real_fit = pipeline_mod.fit

    def spy(model, *a, **k):
        seen["conv1"] = model.conv1.weight.detach().clone()
        seen["fc_bias"] = model.fc.bias.detach().clone()
        return real_fit(model, *a, **k)

    monkeypatch.setattr(pipeline_mod, "fit", spy)
    settings = PruneSettings(budget=0.5, finetune=TrainSettings(epochs=1))
    model, args, report = specialise(base, model_args(10, 1, 0.25), digits, [3, 5, 8], settings, progress=False)
    kept_stem = report["kept_channels"]["conv1"]
    # the model handed to fine-tuning holds base weights (a channel subset), not a fresh init
    assert seen["conv1"].shape[0] == kept_stem
    base_rows = base.conv1.weight.detach()
    assert all(any(torch.equal(r, b) for b in base_rows) for r in seen["conv1"])
    assert torch.equal(seen["fc_bias"], base.fc.bias.detach())
    # and fine-tuning changed them
    assert not torch.equal(model.fc.bias.detach(), base.fc.bias.detach())
    assert report["params_after"] == count_params(model)
