import numpy as np
import pytest
import torch
from PIL import Image

from papm.shared.datasets import DatasetInfo, load_dataset, mean_std_from_sums, pixel_sums, stratified_split
from papm.shared.errors import PapmError
from papm.shared.partition import partition
from papm.shared.training import augment


def test_digits_splits_are_disjoint_and_fixed(digits):
    again = load_dataset("digits", split_seed=0, val_fraction=0.1)
    assert torch.equal(again.val.y, digits.val.y) and torch.equal(again.train.x, digits.train.x)
    other = load_dataset("digits", split_seed=1, val_fraction=0.1)
    assert torch.equal(other.test.x, digits.test.x)  # the test split never moves
    assert not torch.equal(other.val.x, digits.val.x)  # the validation split follows the seed
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert digits.info.in_channels == 1 and digits.info.image_size == 8 and not digits.info.hflip
    # every class is in every split (stratified)
    for split in (digits.train, digits.val, digits.test):
        assert set(split.y.tolist()) == set(range(10))


def test_stratified_split_holds_out_the_fraction():
    y = np.repeat(np.arange(4), 50)
    keep, held = stratified_split(y, 0.2, seed=3)
    assert len(held) == 40 and len(np.intersect1d(keep, held)) == 0
    assert np.bincount(y[held]).tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("method", ["iid", "dirichlet", "by-group"])
def test_partitioners_are_reproducible_and_cover_every_sample_once(method, digits):
    labels = digits.train.y.numpy()
    kw = dict(seed=7, alpha=0.3, groups=[[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]])
    parts = partition(labels, 5, method, **kw)
    assert len(parts) == 5
    together = np.concatenate(parts)
    assert len(together) == len(labels) and len(np.unique(together)) == len(labels)
    again = partition(labels, 5, method, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 5, method, **{**kw, "seed": 8})
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_by_group_nodes_mostly_see_their_groups_classes(digits):
    labels = digits.train.y.numpy()
    groups = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    parts = partition(labels, 6, "by-group", groups=groups, share=0.8, seed=0)
    for node, idx in enumerate(parts):
        own = np.isin(labels[idx], groups[node % 3]).mean()
        assert own > 0.6, (node, own)


def test_bad_partition_arguments(digits):
    with pytest.raises(PapmError, match="unknown partitioner"):
        partition(digits.train.y.numpy(), 3, "stripes")
    with pytest.raises(PapmError, match="at least 4 nodes"):
        partition(digits.train.y.numpy(), 3, "by-group", groups=[[0], [1], [2], [3]])


def write_imagefolder(root, digits, classes=(0, 1, 2), per_class=6, mode="L"):  # noqa: D103
    for split, data in (("train", digits.train), ("test", digits.test)):
        for c in classes:
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            xs = data.x[data.y == c][:per_class]
            for i, x in enumerate(xs):
                Image.fromarray(x[0].numpy(), mode="L").convert(mode).save(d / f"{i}.png")
    return root


def test_imagefolder_tree_loads_with_resize(tmp_path, digits):
    root = write_imagefolder(tmp_path / "tree", digits)
    splits = load_dataset("imagefolder", root, image_size=16, in_channels=3, val_fraction=0.2)
    assert splits.info.class_names == ["class0", "class1", "class2"]
    assert splits.train.x.shape[1:] == (3, 16, 16) and splits.train.x.dtype == torch.uint8
    assert len(splits.train) + len(splits.val) == 18 and len(splits.test) == 18


def test_unreadable_image_names_the_file(tmp_path, digits):
    root = write_imagefolder(tmp_path / "tree", digits)
    bad = root / "train" / "class1" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(PapmError, match="broken.png"):
        load_dataset("imagefolder", root, image_size=8, in_channels=1)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(PapmError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def _shifted(img, dy, dx):
    """``img`` (C x H x W) moved so that out[i, j] = img[i + dy, j + dx], zero where that is outside."""
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = img[:, i + dy, j + dx]
    return out


def _crop_shifts(src, dst, pad):
    """Every (dy, dx) within ``pad`` for which ``dst`` is ``src`` shifted with zero fill."""
    return [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1) if torch.equal(dst, _shifted(src, dy, dx))]


def _noise_batch(n, size=8, seed=0):
    # no zero pixel: a shift with zero fill, a wrap-around and a flip all look different
    return torch.randint(1, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_digits_augmentation_is_a_shift_of_at_most_one_pixel_with_zero_fill(digits):
    info = digits.info
    assert info.crop_padding == 1 and not info.hflip
    for x in (_noise_batch(96), digits.train.x[:96]):
        out = augment(x, info, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == torch.uint8
        shifts = [_crop_shifts(a, b, 1) for a, b in zip(x, out)]
        assert all(shifts), [i for i, s in enumerate(shifts) if not s]  # never flipped, never more than 1 pixel
    # on the noise batch each image's shift is unique: all nine occur (the crop is random per image)
    noise = _noise_batch(96)
    out = augment(noise, info, torch.Generator().manual_seed(0))
    seen = [_crop_shifts(a, b, 1) for a, b in zip(noise, out)]
    assert all(len(s) == 1 for s in seen)
    assert {s[0] for s in seen} == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_flip_augmentation_mirrors_some_crops_and_keeps_others():
    info = DatasetInfo("t", ["a", "b"], 1, 8, [0.5], [0.25], hflip=True, crop_padding=1)
    x = _noise_batch(64, seed=1)
    out = augment(x, info, torch.Generator().manual_seed(0))
    mirrored = [bool(_crop_shifts(a, b.flip(2), 1)) for a, b in zip(x, out)]
    plain = [bool(_crop_shifts(a, b, 1)) for a, b in zip(x, out)]
    assert all(m != p for m, p in zip(mirrored, plain))  # each image is exactly one of the two
    assert 10 < sum(mirrored) < 54  # about half of the batch is mirrored


def test_augmentation_follows_the_generator_seed(digits):
    x = digits.train.x[:64]
    flip = DatasetInfo("t", ["a", "b"], 1, 8, [0.5], [0.25], hflip=True, crop_padding=2)
    for info in (digits.info, flip):
        a = augment(x, info, torch.Generator().manual_seed(5))
        assert torch.equal(a, augment(x, info, torch.Generator().manual_seed(5)))
        assert not torch.equal(a, augment(x, info, torch.Generator().manual_seed(6)))
    # no padding and no flip: the batch is unchanged
    none = DatasetInfo("t", ["a", "b"], 1, 8, [0.5], [0.25], hflip=False, crop_padding=0)
    assert torch.equal(augment(x, none, torch.Generator()), x)


def test_federated_normalisation_equals_the_centralised_one(digits):
    """Nodes send integer pixel sums; their total gives exactly the mean/std of the whole training split."""
    x = digits.train.x
    parts = partition(digits.train.y.numpy(), 5, "dirichlet", alpha=0.5, seed=2)
    sums = [pixel_sums(x[torch.as_tensor(idx)], chunk=37) for idx in parts]
    total = sum(s[0] for s in sums), sum(s[1] for s in sums), sum(s[2] for s in sums)
    mean, std = mean_std_from_sums(*total)
    # what load_dataset stores for the training split
    assert mean == digits.info.mean and std == digits.info.std
    # and the mean/std computed directly on all pixels of the split (unbiased std)
    v = x.double() / 255.0
    assert mean[0] == pytest.approx(float(v.mean()), abs=1e-6)
    assert std[0] == pytest.approx(float(v.std()), abs=1e-6)


def test_pixel_sums_are_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, 60, (50, 6, 7), generator=g), torch.randint(100, 256, (50, 6, 7), generator=g),
                     torch.randint(0, 256, (50, 6, 7), generator=g)], 1).to(torch.uint8)
    total, total_sq, count = pixel_sums(x, chunk=16)
    assert count == 50 * 6 * 7
    assert total.tolist() == x.long().sum(dim=(0, 2, 3)).tolist()
    assert total_sq.tolist() == (x.long() ** 2).sum(dim=(0, 2, 3)).tolist()
    mean, std = mean_std_from_sums(total, total_sq, count)
    v = x.double() / 255.0
    assert mean == pytest.approx(v.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(v.transpose(0, 1).flatten(1).std(1).tolist(), abs=1e-6)
