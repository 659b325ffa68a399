"""Data-free restoration after pruning: exact where the maths says so, no data, same budget, and it helps."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_digits

from papm.shared import datasets as datasets_mod
from papm.shared.errors import PapmError
from papm.shared.importance import PAPMImportance
from papm.shared.models import build_model, count_params, model_args
from papm.shared.pruning import DEFAULT_TOLERANCE, prune_to_budget
from papm.shared.restore import prune_data_free, restore_after_pruning

REMOVED = 5  # the internal channel of layer1.0 that the constructed test removes
COEFFS = {0: 0.7, 1: 0.5, 2: -0.3}  # ... as this combination of kept channels (one negative on purpose)


def _all_kept(args):
    return {name: list(range(n)) for name, n in args["channels"].items()}


def _combination_model(seed=0):
    """A tiny ResNet whose layer1.0 channel REMOVED is, after BN, exactly sum_j COEFFS[j] * channel j.

    BN1 has zero running means and varied scales; beta is large, so every pre-activation of
    the involved channels is positive and relu1 passes them unchanged (checked in the test).
    """
    torch.manual_seed(seed)
    args = model_args(3, 1, 0.125)
    model = build_model(args).eval()
    block = model.layer1[0]
    with torch.no_grad():
        bn = block.bn1
        bn.running_mean.zero_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # the folded BN scale
        folded = sum(c * g[j] * block.conv1.weight[j] for j, c in COEFFS.items())
        block.conv1.weight[REMOVED] = folded / g[REMOVED]
        for j in COEFFS:
            bn.bias[j] = 20.0
        bn.bias[REMOVED] = sum(c * bn.bias[j] for j, c in COEFFS.items())
    return model, args


def _remove_internal_channel(model, args):
    pruned = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=torch.zeros(1, 1, 8, 8))
    dg.get_pruning_group(pruned.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[REMOVED]).prune()
    kept = _all_kept(args)
    kept["layer1.0.conv1"] = [c for c in kept["layer1.0.conv1"] if c != REMOVED]
    return pruned, kept


def _conv2_output(block, x):
    return block.conv2(block.relu1(block.bn1(block.conv1(x))))


def test_a_removed_filter_that_is_a_combination_of_kept_ones_is_restored_exactly():
    model, args = _combination_model()
    pruned, kept = _remove_internal_channel(model, args)  # Torch-Pruning traces with autograd on
    plain = copy.deepcopy(pruned)
    stats = restore_after_pruning(model, pruned, kept, torch.zeros(1, 1, 8, 8), ridge=0.0)
    assert stats["layer1.0.conv1"]["rel_error"] < 1e-6
    assert stats["layer1.0.conv1"]["removed"] == 1

    with torch.no_grad():
        x = torch.rand(16, 8, 8, 8)  # a block input (post-ReLU, so non-negative)
        block = model.layer1[0]
        z = block.bn1(block.conv1(x))
        assert (z[:, [REMOVED, *COEFFS]] > 0).all()  # the ReLU is the identity on every involved channel
        want = _conv2_output(block, x)
        got = _conv2_output(pruned.layer1[0], x)
        without = _conv2_output(plain.layer1[0], x)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale
        assert (without - want).abs().max() >= 0.05 * scale  # plain pruning loses the channel's signal

        # Nothing else changed, so the whole network is restored too (BN corrections are ~0 here).
        images = torch.randn(16, 1, 8, 8)
        ref = model(images)
        assert (pruned(images) - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert (plain(images) - ref).abs().max() >= 1e-2 * ref.abs().max()


def test_restoration_rejects_a_model_that_is_not_the_cut_it_claims():
    model, args = _combination_model()
    pruned, kept = _remove_internal_channel(model, args)
    wrong = dict(kept, **{"layer1.0.conv1": [c for c in range(8) if c != REMOVED - 1]})
    with pytest.raises(PapmError, match="is not `original` cut at `kept`"):
        restore_after_pruning(model, pruned, wrong, torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        pruned.layer2[0].conv1.weight.mul_(1.1)  # e.g. fine-tuned after pruning
    with pytest.raises(PapmError, match="restore right after pruning"):
        restore_after_pruning(model, pruned, kept, torch.zeros(1, 1, 8, 8))


def test_the_activation_model_has_the_moments_of_a_rectified_gaussian():
    from papm.shared.restore import _relu_moments

    mean = torch.tensor([-2.0, -0.5, 0.0, 0.3, 3.0], dtype=torch.float64)
    var = torch.tensor([1.0, 0.25, 2.0, 1.0, 0.5], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    samples = (mean + var.sqrt() * torch.randn(400_000, 5, generator=gen, dtype=torch.float64)).clamp_min(0)
    m, v = _relu_moments(mean, var)
    assert torch.allclose(m, samples.mean(0), atol=5e-3)
    assert torch.allclose(v, samples.var(0), atol=1e-2)


def _randomised(args, seed):
    torch.manual_seed(seed)
    model = build_model(args)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_prune_data_free_uses_no_data_and_meets_the_same_budget(monkeypatch):
    def no_data(*_a, **_k):
        raise AssertionError("data-free pruning loaded a dataset")

    monkeypatch.setattr(datasets_mod, "load_dataset", no_data)
    args = model_args(3, 1, 0.125)
    model = _randomised(args, seed=1)
    reference = copy.deepcopy(model)
    inputs_seen = []

    def note(_module, inputs):
        inputs_seen.append(all(not torch.is_tensor(t) or not t.any() for t in inputs))

    hook = model.register_forward_pre_hook(note)  # every call of the network, with what it was given
    example = torch.randn(4, 1, 16, 16) + 1.0  # real-looking values: only the shape may be used
    result, stats = prune_data_free(model, args, example, 0.5)
    hook.remove()
    assert inputs_seen and all(inputs_seen)  # Torch-Pruning traced the graph, with zeros only

    plain = copy.deepcopy(reference)
    names = {m: n for n, m in plain.named_modules()}
    expected = prune_to_budget(plain, args, torch.zeros(1, 1, 16, 16), PAPMImportance(None, names, alpha=1.0), 0.5)
    assert result.channels == expected.channels and result.kept == expected.kept
    assert result.params_after == expected.params_after == count_params(model) == count_params(plain)
    assert abs(result.reduction - 0.5) <= DEFAULT_TOLERANCE
    # The restoration changed the weights and BN statistics, not the architecture.
    changed = [n for n in stats if "rel_error" in stats[n]]
    assert changed
    block = changed[0].rsplit(".", 1)[0]
    assert not torch.equal(model.get_submodule(f"{block}.conv2").weight, plain.get_submodule(f"{block}.conv2").weight)
    assert not torch.equal(model.get_submodule(f"{block}.bn2").running_mean, plain.get_submodule(f"{block}.bn2").running_mean)

    # restore_after_pruning itself never runs either model.
    def refuse(*_a):
        raise AssertionError("restoration ran a forward pass")

    again = copy.deepcopy(reference)
    fresh = copy.deepcopy(reference)
    names = {m: n for n, m in fresh.named_modules()}
    cut = prune_to_budget(fresh, args, torch.zeros(1, 1, 16, 16), PAPMImportance(None, names, alpha=1.0), 0.5)
    hooks = [m.register_forward_pre_hook(refuse) for net in (again, fresh) for m in net.modules()]
    restore_after_pruning(again, fresh, cut.kept, torch.zeros(1, 1, 16, 16))
    for h in hooks:
        h.remove()


def _digits(n_classes=3):
    d = load_digits()  # 8x8 images, shipped with scikit-learn
    keep = d.target < n_classes
    x = torch.tensor(d.images[keep], dtype=torch.float32)[:, None] / 16.0
    return (x - 0.3) / 0.45, torch.tensor(d.target[keep])


def train_tiny(seed, steps=100):
    """A width-0.125 ResNet trained briefly on 3 digit classes; returns it, its args and held-out images."""
    x, y = _digits()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    x, y = x[perm], y[perm]
    n_train = int(0.7 * len(x))
    torch.manual_seed(seed)
    args = model_args(3, 1, 0.125)
    model = build_model(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, n_train, (64,), generator=gen)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), args, x[n_train:]


def logit_gap(model, args, held_out, budget=0.5):
    """(MSE, top-1 agreement) to the unpruned logits, for plain weight pruning and for data-free restoration."""
    plain = copy.deepcopy(model)
    names = {m: n for n, m in plain.named_modules()}
    prune_to_budget(plain, args, torch.zeros(1, 1, 8, 8), PAPMImportance(None, names, alpha=1.0), budget)
    restored = copy.deepcopy(model)
    prune_data_free(restored, args, torch.zeros(1, 1, 8, 8), budget)
    out = {}
    with torch.no_grad():
        ref = model(held_out)
        for label, net in (("plain", plain), ("restored", restored)):
            logits = net(held_out)
            out[label] = (F.mse_loss(logits, ref).item(), (logits.argmax(1) == ref.argmax(1)).float().mean().item())
    return out


# Margins checked on seeds 0-11: restored/plain MSE 0.05-0.51 and agreement +0.01 to +0.57 on 11 of
# them (seed 4: plain already agrees on 97.5%); on seed 6 the cut leaves 2 of 8 stem channels, both
# models predict one class for everything and restoration does not help (MSE x1.14). Seeds 0 and 1
# clear the margins below by far (MSE x0.20 / x0.33, agreement +0.57 / +0.44).
@pytest.mark.parametrize("seed", [0, 1])
def test_restoration_brings_a_trained_pruned_model_closer_to_the_unpruned_one(seed):
    model, args, held_out = train_tiny(seed)
    gap = logit_gap(model, args, held_out)
    (mse_plain, agree_plain), (mse_restored, agree_restored) = gap["plain"], gap["restored"]
    assert mse_restored < 0.85 * mse_plain, gap
    assert agree_restored >= agree_plain + 0.05, gap
