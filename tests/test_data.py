import numpy as np
import pytest
import torch
from PIL import Image

from papm.shared.datasets import DatasetInfo, load_dataset, stratified_split
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


def test_batch_augmentation_crops_and_flips_whole_batches():
    info = DatasetInfo("t", ["a", "b"], 1, 4, [0.5], [0.25], hflip=True, crop_padding=1)
    x = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment(x, info, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out != x).any(1).flatten(1).any(1).float().mean() > 0.5  # most images moved
    # a crop shifts content: every non-padding pixel comes from the source image
    none = DatasetInfo("t", ["a", "b"], 1, 4, [0.5], [0.25], hflip=False, crop_padding=0)
    assert torch.equal(augment(x, none, torch.Generator()), x)
