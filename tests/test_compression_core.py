"""Weight sparsity (magnitude, 2:4) and low-bit quantisation (RTN, GPTQ) on tiny models."""

import copy
import math

import pytest
import torch
from torch import nn

from papm.shared.errors import PapmError
from papm.shared.lowbit import distinct_values_per_channel, gptq_weight, quantize_gptq, quantize_rtn
from papm.shared.models import build_model, model_args
from papm.shared.sparsity import MaskKeeper, apply_masks, magnitude_masks, n_m_masks, sparsity_report, weight_layers


def tiny_resnet(seed: int = 0, in_channels: int = 1):
    torch.manual_seed(seed)
    return build_model(model_args(3, in_channels, 0.125))


def with_bn_statistics(model, in_channels=1, size=8, seed=1):
    """Running statistics from a few training-mode batches, so eval-mode activations have a sane scale."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, in_channels, size, size))
    return model.eval()


def zeros_of(model, names):
    return sum(int((dict(model.named_modules())[n].weight == 0).sum()) for n in names)


# ---- magnitude masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_zero_exactly_the_requested_count(sparsity, scope):
    model = tiny_resnet()
    fc_before = model.fc.weight.clone()
    masks = magnitude_masks(model, sparsity, scope=scope)
    assert "fc" not in masks  # classifier excluded by default
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(masks) == sorted(convs)
    apply_masks(model, masks)
    if scope == "global":
        total = sum(dict(model.named_modules())[n].weight.numel() for n in convs)
        assert zeros_of(model, convs) == round(sparsity * total)
    else:
        for n in convs:
            w = dict(model.named_modules())[n].weight
            assert int((w == 0).sum()) == round(sparsity * w.numel()), n
    assert torch.equal(model.fc.weight, fc_before)


def test_global_scope_is_one_threshold_and_layer_scope_is_one_per_layer():
    model = tiny_resnet()
    weights = {n: m.weight.detach().abs() for n, m in weight_layers(model, include_classifier=False).items()}
    glob = magnitude_masks(model, 0.5, scope="global")
    pruned_max = max(float(weights[n][~glob[n]].max()) for n in weights)
    kept_min = min(float(weights[n][glob[n]].min()) for n in weights)
    assert pruned_max <= kept_min  # a single cut over all layers
    # default init scales weights by 1/sqrt(fan_in): the wide late layers hold the small weights
    per_layer = {n: 1 - glob[n].float().mean().item() for n in glob}
    assert per_layer["layer4.1.conv2"] > 0.55 and per_layer["conv1"] < 0.2
    layer = magnitude_masks(model, 0.5, scope="layer")
    assert all(abs((1 - layer[n].float().mean().item()) - 0.5) < 0.01 for n in layer)
    # per layer, the cut is still by magnitude; across layers it is not one threshold any more
    for n in weights:
        assert float(weights[n][~layer[n]].max()) <= float(weights[n][layer[n]].min())
    pruned_max = max(float(weights[n][~layer[n]].max()) for n in weights)
    assert pruned_max > min(float(weights[n][layer[n]].min()) for n in weights)


def test_classifier_is_masked_only_when_included_and_ties_are_deterministic():
    model = tiny_resnet()
    masks = magnitude_masks(model, 0.5, include_classifier=True)
    assert "fc" in masks and not bool(masks["fc"].all())
    with torch.no_grad():
        for m in weight_layers(model).values():
            m.weight.fill_(1.0)  # all tied: the earliest positions go first
    tied = magnitude_masks(model, 0.25, scope="layer")
    flat = tied["layer1.0.conv1"].reshape(-1)
    k = round(0.25 * flat.numel())
    assert not flat[:k].any() and flat[k:].all()


def test_masks_leave_a_plain_model_that_saves_and_loads():
    model = tiny_resnet()
    apply_masks(model, magnitude_masks(model, 0.7))
    fresh = tiny_resnet(seed=5)
    assert model.state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(not n.endswith("_orig") and not n.endswith("_mask") for n, _ in model.named_parameters())


# ---- N:M masks ------------------------------------------------------------------------------------


def groups_of_four(weight):
    """(out, in[, kh, kw]) -> rows of 4 consecutive input channels at one kernel position (channels-last)."""
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, 4)


def test_two_four_keeps_exactly_the_two_largest_of_every_group():
    model = tiny_resnet()
    original = {n: m.weight.detach().clone() for n, m in weight_layers(model, include_classifier=True).items()}
    masks, skipped = n_m_masks(model, 2, 4, include_classifier=True)
    assert skipped == ["conv1"]  # the 1-channel stem cannot hold groups of 4
    assert "fc" in masks
    apply_masks(model, masks)
    layers = weight_layers(model, include_classifier=True)
    assert torch.equal(layers["conv1"].weight, original["conv1"])  # skipped layers untouched
    for name in masks:
        masked = groups_of_four(layers[name].weight.detach())
        assert bool(((masked != 0).sum(dim=1) == 2).all()), name
        magnitude = groups_of_four(original[name]).abs()
        kept = masked != 0
        smallest_kept = magnitude.masked_fill(~kept, math.inf).amin(1)
        assert bool((smallest_kept >= magnitude.masked_fill(kept, -1).amax(1)).all()), name


def test_two_four_reports_layers_it_cannot_pattern_and_refuses_when_none_can():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Conv2d(6, 8, 1), nn.Flatten(), nn.Linear(8, 3))
    masks, skipped = n_m_masks(model)
    assert list(masks) == ["0"] and skipped == ["1"]  # 6 input channels; the classifier is excluded
    with pytest.raises(PapmError, match="multiple of 4"):
        n_m_masks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 3)))
    with pytest.raises(PapmError, match="1 <= n < m"):
        n_m_masks(model, 4, 4)


# ---- keeping masks through fine-tuning ------------------------------------------------------------


def test_masks_kept_acts_on_the_masked_models_optimiser_only():
    """masks_kept hooks every optimiser in the process (fit builds its own); only one that steps the masked
    weights re-zeroes them, so another model trained meanwhile (the warm worker, a thread) costs nothing."""
    from papm.shared.compression import masks_kept

    model, other = tiny_resnet(), tiny_resnet()
    masks = magnitude_masks(model, 0.8)
    keeper = MaskKeeper(model, masks)
    calls = []
    keeper.reapply = lambda real=keeper.reapply: calls.append(1) or real()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    with masks_kept(keeper):
        for m in (other, model):
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            assert len(calls) == (0 if m is other else 1)
    layers = dict(model.named_modules())
    assert all(not bool(layers[n].weight[~masks[n]].any()) for n in masks)


@pytest.mark.parametrize("use_attach", [False, True])
def test_mask_keeper_keeps_zeros_zero_through_sgd_with_momentum_and_decay(use_attach):
    model = tiny_resnet()
    masks = magnitude_masks(model, 0.8)
    keeper = MaskKeeper(model, masks)
    pruned = [n for n in masks]
    zeros = zeros_of(model, pruned)
    assert zeros > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if use_attach:
        keeper.attach(opt)
    torch.manual_seed(3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    layers = dict(model.named_modules())
    for step in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        # the gradient does reach the masked weights: without re-zeroing they would move
        assert any(bool(layers[n].weight.grad[~masks[n]].abs().sum() > 0) for n in pruned)
        opt.step()
        if not use_attach:
            keeper.reapply()
        assert zeros_of(model, pruned) == zeros
        for n in pruned:
            assert not bool(layers[n].weight[~masks[n]].any())


def test_without_the_keeper_a_step_undoes_the_mask():
    """The control for the test above: the SGD step itself does refill pruned weights."""
    model = tiny_resnet()
    masks = magnitude_masks(model, 0.8)
    apply_masks(model, masks)
    zeros = zeros_of(model, list(masks))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(3)
    nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    assert zeros_of(model, list(masks)) < zeros


# ---- report ---------------------------------------------------------------------------------------


def test_sparsity_report_counts_and_shows_the_compression_gain():
    model = tiny_resnet()
    dense = sparsity_report(model)
    params = sum(p.numel() for p in model.parameters())
    assert dense["total_params"] == params and dense["layers"]["layer2.0.conv1"] == 0.0
    assert dense["dense_bytes"] == sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
                                       for t in model.state_dict().values())
    masks = magnitude_masks(model, 0.9)
    apply_masks(model, masks)
    report = sparsity_report(model)
    zeroed = sum(int((~m).sum()) for m in masks.values())
    assert report["nonzero_params"] == dense["nonzero_params"] - zeroed
    assert report["sparsity"] == pytest.approx(1 - report["nonzero_params"] / params)
    assert report["layers"]["layer4.1.conv2"] == pytest.approx(1 - masks["layer4.1.conv2"].float().mean().item())
    assert report["layers"]["fc"] == 0.0
    # 90% zeros: random fp32 barely compresses, the sparse weights shrink to well under half
    assert dense["compressed_bytes"] > 0.85 * dense["dense_bytes"]
    assert report["compressed_bytes"] < 0.5 * dense["compressed_bytes"]


# ---- low-bit quantisation -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantised_weights_sit_on_at_most_2_to_the_bits_levels(bits, method):
    model = with_bn_statistics(tiny_resnet())
    layers = weight_layers(model)
    # unquantised, the wide layers hold far more distinct values than any bit width allows
    assert distinct_values_per_channel(layers["layer4.1.conv2"].weight) > 2 ** 8
    if method == "rtn":
        stats = quantize_rtn(model, bits)
    else:
        torch.manual_seed(2)
        stats = quantize_gptq(model, bits, torch.randn(16, 1, 8, 8), batch_size=8)
    assert set(stats) == set(layers)
    qmax = 2 ** (bits - 1) - 1
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert distinct_values_per_channel(w) <= 2 ** bits - 1, name  # symmetric: -qmax .. qmax
        levels = w.reshape(w.shape[0], -1) / stats[name]["scale"][:, None]
        assert torch.allclose(levels, levels.round(), atol=1e-3), name
        assert float(levels.abs().max()) <= qmax + 1e-3, name


def correlated_linear_case(seed=0, n=512, d=64, out=16):
    """A Linear layer fed strongly correlated inputs (rank-6 signal plus a little noise)."""
    torch.manual_seed(seed)
    x = torch.randn(n, 6) @ torch.randn(6, d) + 0.05 * torch.randn(n, d)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, out))
    return model, x.reshape(n, 1, 8, d // 8)


@torch.no_grad()
def output_error(layer_float, layer_quant, x):
    return float((layer_float(x) - layer_quant(x)).pow(2).sum())


def test_gptq_beats_rtn_on_a_linear_layer_at_3_bits():
    model, calib = correlated_linear_case()
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    quantize_rtn(rtn, 3)
    quantize_gptq(gptq, 3, calib, batch_size=128)
    x = calib.flatten(1)
    err_rtn = output_error(model[1], rtn[1], x)
    err_gptq = output_error(model[1], gptq[1], x)
    assert err_gptq < 0.5 * err_rtn  # it trades weight error for output error
    def weight_error(quantised):
        return float((quantised[1].weight - model[1].weight).detach().pow(2).sum())

    assert weight_error(gptq) > weight_error(rtn)


def test_gptq_beats_rtn_on_a_convolution_so_im2col_matches_the_weight_layout():
    torch.manual_seed(0)
    # smooth images: neighbouring pixels and the channels are correlated
    calib = nn.functional.interpolate(torch.randn(64, 1, 4, 4), size=12, mode="bilinear") * torch.randn(1, 4, 1, 1)
    calib = calib + 0.05 * torch.randn_like(calib)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2))
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    quantize_rtn(rtn, 3)
    stats = quantize_gptq(gptq, 3, calib, batch_size=16)
    assert stats["0"]["samples"] == 64 * 6 * 6
    assert output_error(model, gptq, calib) < 0.5 * output_error(model, rtn, calib)


def test_gptq_collects_each_layers_inputs_through_the_quantised_layers_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    calib = (torch.randn(128, 6) @ torch.randn(6, 64)).reshape(128, 1, 8, 8)
    quantised = copy.deepcopy(model)
    quantize_gptq(quantised, 3, calib, batch_size=32)
    x = calib.flatten(1)
    q1, _ = gptq_weight(model[1].weight, 2 * x.T @ x / len(x), 3)
    assert torch.allclose(quantised[1].weight, q1, atol=1e-6)
    with torch.no_grad():
        seen = torch.relu(x @ q1.T + model[1].bias)  # through the quantised first layer
        float_seen = torch.relu(model[1](x))
    q2, _ = gptq_weight(model[3].weight, 2 * seen.T @ seen / len(x), 3)
    q2_float_inputs, _ = gptq_weight(model[3].weight, 2 * float_seen.T @ float_seen / len(x), 3)
    assert not torch.allclose(q2, q2_float_inputs)  # the two choices are distinguishable here
    assert torch.allclose(quantised[3].weight, q2, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_eight_bit_model_output_stays_close_to_float(method):
    """Tolerance: at 8 bits a weight moves at most half a step, max|W[c]| / 254 (0.4% of its channel's
    range, ~0.25% of a typical weight's size on average). ~20 layers compound such independent
    perturbations to ~1% of the logits' size; 3% leaves margin, and 2 bits misses it by far."""
    model = with_bn_statistics(tiny_resnet())
    torch.manual_seed(4)
    calib, test = torch.randn(32, 1, 8, 8), torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        reference = model(test)

    def relative_error(bits):
        quant = copy.deepcopy(model)
        if method == "rtn":
            quantize_rtn(quant, bits)
        else:
            quantize_gptq(quant, bits, calib, batch_size=16)
        with torch.no_grad():
            return float((quant(test) - reference).norm() / reference.norm())

    assert relative_error(8) < 0.03
    assert relative_error(2) > 0.1  # the measure does see quantisation error


def test_gptq_keeps_a_sparse_model_sparse_and_restores_training_mode():
    model = with_bn_statistics(tiny_resnet())
    masks = magnitude_masks(model, 0.5)
    apply_masks(model, masks)
    zeros = zeros_of(model, list(masks))
    model.train()
    torch.manual_seed(2)
    quantize_gptq(model, 4, torch.randn(16, 1, 8, 8))
    assert model.training
    layers = dict(model.named_modules())
    assert all(not bool(layers[n].weight[~masks[n]].any()) for n in masks)
    assert zeros_of(model, list(masks)) >= zeros


# ---- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_a_message_that_says_what_to_pass():
    model = tiny_resnet()
    calib = torch.randn(4, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PapmError, match=r"bits must be one of 2, 3, 4, 5, 6, 7, 8, got 1"):
        quantize_rtn(model, 1)
    with pytest.raises(PapmError, match=r"bits must be one of .*got 16"):
        quantize_gptq(model, 16, calib)
    for bad in (1.5, float("nan"), 1.0, -0.1):
        with pytest.raises(PapmError, match=r"sparsity must be in \[0, 1\)"):
            magnitude_masks(model, bad)
    with pytest.raises(PapmError, match="scope must be one of global, layer"):
        magnitude_masks(model, 0.5, scope="channel")
    with pytest.raises(PapmError, match="calibration must be a non-empty"):
        quantize_gptq(model, 4, torch.empty(0, 1, 8, 8))
    with pytest.raises(PapmError, match="calibration must be a non-empty"):
        quantize_gptq(model, 4, torch.randn(8, 64))
    with pytest.raises(PapmError, match="NaN or inf"):
        quantize_gptq(model, 4, torch.full((2, 1, 8, 8), float("nan")))
    masks = magnitude_masks(model, 0.5)
    with pytest.raises(PapmError, match="names no layer"):
        apply_masks(model, {"layer9.conv": masks["conv1"]})
    with pytest.raises(PapmError, match="has shape"):
        apply_masks(model, {"conv1": masks["layer1.0.conv1"]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refusals changed nothing
