import pytest
import torch

from papm.shared.checkpoint import load_checkpoint, save_checkpoint
from papm.shared.errors import PapmError
from papm.shared.models import ResNet18, build_model, count_params, default_channels, model_args, params_for_channels


def test_width_one_has_the_reference_parameter_count():
    assert count_params(ResNet18(10, 3, 1.0)) == 11_173_962


@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 16), (3, 32)])
def test_forward_and_features_for_small_and_cifar_inputs(in_channels, size):
    model = ResNet18(7, in_channels, 0.25).eval()
    x = torch.randn(3, in_channels, size, size)
    assert model(x).shape == (3, 7)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim) == (3, 128)
    # features are what the classifier consumes
    torch.testing.assert_close(model.fc(feats), model(x))


def test_meta_parameter_count_matches_real_model():
    args = model_args(10, 3, 0.5)
    assert params_for_channels(args) == count_params(build_model(args))


def test_inconsistent_channel_table_is_rejected():
    ch = default_channels(0.25)
    ch["layer1.0.conv2"] = 5  # identity shortcut needs 16
    with pytest.raises(PapmError, match="layer1.0.conv2"):
        ResNet18(10, 3, 0.25, ch)


def test_checkpoint_roundtrip_rebuilds_from_metadata(tmp_path, digits):
    ch = default_channels(0.25)
    for k in ("layer2.0.conv1", "layer3.1.conv1"):
        ch[k] = 7
    args = model_args(10, 1, 0.25, ch)
    model = build_model(args).eval()
    save_checkpoint(tmp_path / "m.pt", model, args, digits.info, kind="pruned")
    # loadable with weights_only=True: nothing but tensors and plain containers
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["model_args"]["channels"]["layer2.0.conv1"] == 7
    loaded, info, _ = load_checkpoint(tmp_path / "m.pt")
    assert info.class_names == digits.info.class_names and info.mean == digits.info.mean
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
