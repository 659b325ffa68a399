"""BatchNorm re-estimation from sums: additive across nodes, exact statistics, restores a broken model."""

import copy

import pytest
import torch
from torch import nn

from papm.shared.bn import BNSums, bn_input_sums, bn_layers, recalibrate_bn, set_bn_statistics
from papm.shared.checkpoint import load_checkpoint
from papm.shared.errors import PapmError
from papm.shared.partition import partition
from papm.shared.training import evaluate


def test_statistics_are_the_mean_and_unbiased_variance_of_the_layer_inputs():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    x = torch.randn(10, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3.0
    sums = BNSums({"": x.double().sum((0, 2, 3))}, {"": (x.double() ** 2).sum((0, 2, 3))}, {"": 160})
    set_bn_statistics(bn, sums)
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True), rtol=1e-5)


def test_node_sums_add_up_to_the_centralised_sums(base_ckpt, digits):
    """Three nodes' sums, added, equal one machine running the same batches over all the data."""
    model, info, _ = load_checkpoint(base_ckpt)
    parts = [digits.train.subset(p) for p in partition(digits.train.y.numpy(), 3, "dirichlet", seed=1, alpha=0.5)]
    per_node = [bn_input_sums(model, p, info, batch_size=64, seed=7) for p in parts]
    total = per_node[0] + per_node[1] + per_node[2]
    # the centralised run: one process, the same batches (each node's batching), one accumulator
    central = BNSums.zeros_like(model)
    for p in parts:
        central = central + bn_input_sums(model, p, info, batch_size=64, seed=7)
    assert total.counts == central.counts and sum(len(p) for p in parts) == len(digits.train)
    first = next(iter(total.counts))
    assert total.counts[first] == len(digits.train) * info.image_size ** 2  # the stem's BN sees every pixel once
    for name in total.sums:
        assert torch.allclose(total.sums[name], central.sums[name], rtol=1e-12, atol=1e-9)
        assert torch.allclose(total.sqsums[name], central.sqsums[name], rtol=1e-12, atol=1e-9)
    # round trip through arrays (what travels in a message)
    back = BNSums.from_arrays({k: v.numpy() for k, v in total.to_arrays().items()})
    assert back.counts == total.counts and all(torch.equal(back.sums[k], total.sums[k]) for k in total.sums)
    # different batches change the estimate only slightly (batch statistics normalise earlier layers)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    set_bn_statistics(a, total)
    set_bn_statistics(b, bn_input_sums(model, digits.train, info, batch_size=64, seed=3))
    for la, lb in zip(bn_layers(a).values(), bn_layers(b).values()):
        assert torch.allclose(la.running_mean, lb.running_mean, atol=0.1 + 0.1 * float(lb.running_mean.abs().max()))


def test_recalibration_restores_a_model_whose_statistics_were_averaged_away(base_ckpt, digits):
    model, info, _ = load_checkpoint(base_ckpt)
    good = evaluate(model, digits.test, info)["accuracy"]
    broken = copy.deepcopy(model)
    for layer in bn_layers(broken).values():  # what averaging unrelated running statistics can leave
        layer.running_mean.fill_(1.0)
        layer.running_var.fill_(0.01)
    assert evaluate(broken, digits.test, info)["accuracy"] < good - 0.3
    weights = {k: v.clone() for k, v in broken.state_dict().items() if "running" not in k and "num_batches" not in k}
    momenta = [layer.momentum for layer in bn_layers(broken).values()]
    recalibrate_bn(broken, digits.train.sample(512, 0), info)
    assert evaluate(broken, digits.test, info)["accuracy"] >= good - 0.03
    for k, v in broken.state_dict().items():  # only running statistics moved
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert [layer.momentum for layer in bn_layers(broken).values()] == momenta and not broken.training


def test_tiny_data_is_refused_clearly():
    bn = nn.Sequential(nn.BatchNorm2d(2))
    sums = BNSums({"0": torch.zeros(2, dtype=torch.float64)}, {"0": torch.zeros(2, dtype=torch.float64)}, {"0": 1})
    with pytest.raises(PapmError, match="at least 2 values"):
        set_bn_statistics(bn, sums)
