"""Real-image paths: any image size and channels, devices with their own trees, the image cache,
non-IID nodes that stay in the run, bounded memory, and the run's input shape from a checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from papm.shared import image_cache
from papm.shared.checkpoint import resolve_run_inputs
from papm.shared.config import PHASES, RunConfig
from papm.shared.datasets import load_dataset
from papm.shared.errors import PapmError
from papm.shared.images import load_images
from papm.shared.partition import label_skew, partition, skew_is_real
from papm.shared.specialise import local_apoz_counts, objective_weight

from conftest import pattern_base, run_papm, write_pattern_folder


@pytest.mark.parametrize("size,channels", [(48, 3), (16, 1), (8, 3)])
def test_imagefolder_at_any_size_and_channels(tmp_path, size, channels):
    root = write_pattern_folder(tmp_path / "data", per_class=6, size=40)
    splits = load_dataset("imagefolder", root, image_size=size, in_channels=channels)
    assert tuple(splits.train.x.shape[1:]) == (channels, size, size) and splits.train.x.dtype == torch.uint8
    assert tuple(splits.test.x.shape[1:]) == (channels, size, size) and len(splits.test) == 18
    assert (splits.info.image_size, splits.info.in_channels) == (size, channels)
    assert splits.info.class_names == ["circle", "square", "stripes"]


def test_a_device_tree_needs_only_train(tmp_path):
    root = write_pattern_folder(tmp_path / "dev", per_class=10, parts=("train",))
    splits = load_dataset("imagefolder", root, image_size=48, in_channels=3, parts=("train",), val_fraction=0.2)
    assert len(splits.train) + len(splits.val) == 30 and len(splits.val) == 6 and len(splits.test) == 0
    again = load_dataset("imagefolder", root, image_size=48, in_channels=3, parts=("train",), val_fraction=0.2)
    assert torch.equal(again.val.x, splits.val.x)  # the evaluation split is seeded
    with pytest.raises(PapmError, match="train/<class>/"):
        load_dataset("imagefolder", tmp_path / "dev" / "train", parts=("train",))
    coordinator = write_pattern_folder(tmp_path / "coord", per_class=4, parts=("test",))
    test_only = load_dataset("imagefolder", coordinator, image_size=48, parts=("test",))
    assert len(test_only.test) == 12 and len(test_only.train) == 0


def test_the_cache_decodes_once_and_notices_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPM_CACHE_DIR", str(tmp_path / "cache"))
    root = write_pattern_folder(tmp_path / "data", per_class=5)
    first = load_dataset("imagefolder", root, image_size=24)
    calls = []
    real = image_cache.load_images
    monkeypatch.setattr(image_cache, "load_images", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = load_dataset("imagefolder", root, image_size=24)
    assert calls == [] and torch.equal(first.train.x, second.train.x) and torch.equal(first.test.x, second.test.x)
    load_dataset("imagefolder", root, image_size=32)  # another size: decoded again
    assert len(calls) == 2
    victim = sorted((root / "train" / "square").iterdir())[0]
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(victim)  # changed content, size and time
    third = load_dataset("imagefolder", root, image_size=24)
    assert len(calls) == 3
    assert int(third.train.x.sum()) + int(third.val.x.sum()) != int(first.train.x.sum()) + int(first.val.x.sum())
    for damage in (b"", b"\x93NUMPY", b"junk" * 100):  # emptied (numpy: EOFError), cut short, overwritten
        for f in (tmp_path / "cache").iterdir():
            f.write_bytes(damage)
        again = load_dataset("imagefolder", root, image_size=24)  # decoded again and the cache file replaced
        assert torch.equal(again.train.x, third.train.x) and torch.equal(again.test.x, third.test.x)
    (tmp_path / "file").write_text("mine")  # a file named as the cache: one line, the file untouched
    monkeypatch.setenv("PAPM_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(PapmError, match=r"file is a file, not a folder; point PAPM_CACHE_DIR at a folder"):
        load_dataset("imagefolder", root, image_size=24)
    assert (tmp_path / "file").read_text() == "mine"
    monkeypatch.setenv("PAPM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").chmod(0o500)  # a read-only cache costs a decode, never a failure
    try:
        load_dataset("imagefolder", root, image_size=20)
    finally:
        (tmp_path / "cache").chmod(0o700)


def test_parallel_decoding_gives_the_same_arrays(tmp_path):
    root = write_pattern_folder(tmp_path / "data", per_class=8, size=36)
    files = sorted((root / "train").rglob("*.png"))
    serial = load_images(files, 3, 32, workers=1)
    parallel = load_images(files, 3, 32, workers=2, min_parallel=1)
    assert serial.shape == (24, 3, 32, 32) and np.array_equal(serial, parallel)


def test_every_unreadable_photo_is_named_in_one_line(tmp_path):
    """A tree with several broken files (empty, truncated, not an image) is cleaned in one run: the error names them
    all, decoded in one process or several; a single broken file keeps its own message."""
    root = write_pattern_folder(tmp_path / "data", per_class=8, size=36, parts=("train",))
    files = sorted((root / "train").rglob("*.png"))
    (root / "train" / "circle" / "empty.png").write_bytes(b"")
    (root / "train" / "square" / "cut.png").write_bytes(files[0].read_bytes()[:60])
    (root / "train" / "stripes" / "notes.png").write_text("not an image")
    bad = sorted(str(p) for p in (root / "train").rglob("*.png") if p not in files)
    everything = sorted((root / "train").rglob("*.png"))
    for kw in ({"workers": 1}, {"workers": 2, "min_parallel": 1}):
        with pytest.raises(PapmError) as e:
            load_images(everything, 3, 32, **kw)
        message = str(e.value)
        assert message.startswith(f"cannot read 3 of {len(everything)} images: ") and all(b in message for b in bad)
        assert message.endswith("remove or replace those files")
    with pytest.raises(PapmError, match=r"cannot read image .*empty.png: .*; remove or replace the file"):
        load_images(files + [root / "train" / "circle" / "empty.png"], 3, 32, workers=1)
    # bad files in train/ and in test/: one error names both splits' files (one run to clean the whole tree)
    write_pattern_folder(root, per_class=4, size=36, parts=("test",))
    (root / "test" / "square" / "zero.png").write_bytes(b"")
    with pytest.raises(PapmError) as e:
        load_dataset("imagefolder", root, image_size=32)
    message = str(e.value)
    assert all(b in message for b in bad) and "zero.png" in message and message.count("; ") == 1, message


def test_16_bit_grey_images_keep_their_contrast(tmp_path):
    """Pillow's convert("L") turns every 16-bit value above 255 white; a 16-bit scan must read as its top 8 bits,
    at every size and as grey or RGB, the same as the 8-bit file it would be saved as."""
    from PIL import Image

    from papm.shared.images import load_image

    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(a).save(tmp_path / "scan16.png")
    Image.fromarray((a >> 8).astype(np.uint8)).save(tmp_path / "scan8.png")
    for channels, size in ((1, 64), (3, 64), (1, 24)):
        x16 = load_image(tmp_path / "scan16.png", channels, size)
        assert np.array_equal(x16, load_image(tmp_path / "scan8.png", channels, size))
        assert x16.shape == (channels, size, size)
    assert load_image(tmp_path / "scan16.png", 1, 64).std() > 50  # a gradient, not a white page


def test_32_bit_and_float_grey_files_read_by_their_range(tmp_path):
    """32-bit integer and float TIFFs (scientific and thermal cameras) carry no range of their own; they read as the
    8-bit file of the same picture, not black (Pillow clips 0-1 floats to 0) or white."""
    from PIL import Image

    from papm.shared.images import load_image

    g8 = ((np.arange(48 * 48).reshape(48, 48) * 7) % 256).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    want = load_image(tmp_path / "g8.png", 1, 48)
    as_written = {
        "int32-0-255.tif": g8.astype(np.int32),
        "int32-0-65535.tif": g8.astype(np.int32) << 8,
        "int32-full.tif": g8.astype(np.int32) << 23,  # up to 2^31 - 2^23
        "float-0-1.tif": g8.astype(np.float32) / 255,
        "float-0-255.tif": g8.astype(np.float32),
    }
    for name, a in as_written.items():
        Image.fromarray(a).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode in ("I", "F")
        got = load_image(tmp_path / name, 1, 48)
        assert np.array_equal(got, want), name
    nan = g8.astype(np.float32) / 255
    nan[0, :] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    got = load_image(tmp_path / "nan.tif", 3, 48)  # NaN pixels black, the rest as the 8-bit file; as RGB too
    assert got.shape == (3, 48, 48) and (got[:, 0] == 0).all() and np.array_equal(got[0, 1:], want[0, 1:])


def test_a_checkpoint_names_its_data_folder_from_anywhere(tmp_path, monkeypatch):
    """Trained on a relative --data-root, the checkpoint names the folder absolutely, so `papm simulate`, `prune` and
    `export` find it from any working folder; data moved since is one line that says where the path came from."""
    from papm.shared.datasets import load_dataset_like

    write_pattern_folder(tmp_path / "photos", per_class=6, size=16)
    monkeypatch.chdir(tmp_path)
    info = load_dataset("imagefolder", "photos", image_size=16).info
    assert info.source == str(tmp_path / "photos") and Path(info.source).is_absolute()
    monkeypatch.chdir("/")
    assert load_dataset_like(info).info.class_names == ["circle", "square", "stripes"]
    (tmp_path / "photos").rename(tmp_path / "moved")
    with pytest.raises(PapmError, match="data folder .*photos .* is not a folder here.*give --data-root"):
        load_dataset_like(info)
    assert len(load_dataset_like(info, root=tmp_path / "moved").test) == 18
    from papm.shared.checkpoint import save_checkpoint
    from papm.shared.models import ResNet18, model_args

    save_checkpoint(tmp_path / "base.pt", ResNet18(3, 3, 0.125), model_args(3, 3, 0.125), info, kind="base")
    with pytest.raises(PapmError, match="was trained on .*photos, which is not a folder here.*set data-root"):
        resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={tmp_path / 'base.pt'}"]))
    moved = resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={tmp_path / 'base.pt'}", f"data-root={tmp_path / 'moved'}"]))
    assert moved.data_root == str(tmp_path / "moved") and moved.image_size == 16


def test_training_on_a_tree_without_test_split_says_so(tmp_path):
    root = write_pattern_folder(tmp_path / "photos", per_class=8, size=16, parts=("train",))
    r = run_papm("train", "--dataset", "imagefolder", "--data-root", root, "--image-size", "16", "--width", "0.125",
                 "--epochs", "1", "--out", tmp_path / "base.pt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test accuracy not measured" in r.stdout and "nan" not in r.stdout and (tmp_path / "base.pt").is_file()
    # 21 training images at the default batch of 128: one step an epoch, said once, with a batch size that fits
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")] == [
        "warning: 21 training images at --batch-size 128 make 1 step(s) per epoch, 1 in all; a small set trains better "
        "with a smaller batch (e.g. --batch-size 8) or more --epochs"], r.stderr
    r = run_papm("train", "--dataset", "imagefolder", "--data-root", root, "--image-size", "16", "--width", "0.125",
                 "--epochs", "1", "--batch-size", "2", "--val-fraction", "0", "--out", tmp_path / "b2.pt", "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 0 and "warning:" not in r.stderr, r.stderr[-2000:]  # batch 2: 12 steps an epoch
    assert "no validation split (--val-fraction 0): the last epoch's weights are kept" in r.stdout and "nan" not in r.stdout


def test_a_photo_stored_sideways_reads_upright(tmp_path):
    """A phone stores a portrait photo sideways with an EXIF Orientation tag; training and `papm infer` read it as
    its owner's viewer shows it, every orientation (2-8) alike; an untagged file or tag 1 reads as stored."""
    from PIL import Image

    from papm.shared.images import load_image

    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8))  # portrait: 32 wide, 48 high
    expected = load_image(_save(upright, tmp_path / "upright.png"), 3, 32)
    # what each tag tells a viewer to do, inverted: the file holds the upright photo put through the inverse
    stored_as = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_270}
    for tag, inverse in stored_as.items():
        path = _save(upright.transpose(inverse), tmp_path / f"tag{tag}.png", orientation=tag)
        assert np.array_equal(load_image(path, 3, 32), expected), tag
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    for path in (_save(sideways, tmp_path / "untagged.png"), _save(sideways, tmp_path / "tag1.png", orientation=1)):
        assert np.array_equal(load_image(path, 3, 32), load_image(_save(sideways, tmp_path / "plain.png"), 3, 32))
        assert not np.array_equal(load_image(path, 3, 32), expected)


def test_hidden_files_beside_the_photos_are_not_read(tmp_path):
    """A tree copied from a Mac carries ``._name.png`` AppleDouble files (not images) and Jupyter leaves
    ``.ipynb_checkpoints/``: training and `papm infer` on a folder read the photos only (`papm bench --test-dir`:
    tests/test_edge.py)."""
    from papm.deploy.runtime import expand_inputs
    from papm.shared.images import image_files

    root = write_pattern_folder(tmp_path / "data", per_class=6, size=24)
    photos = {split: sorted((root / split).rglob("*.png")) for split in ("train", "test")}
    for split in ("train", "test"):
        for d in sorted((root / split).iterdir()):
            (d / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
            (d / ".ipynb_checkpoints").mkdir()
            (d / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"not an image")
        (root / split / ".ipynb_checkpoints").mkdir()  # a hidden folder beside the class folders
    data = load_dataset("imagefolder", root, image_size=24)
    assert len(data.train.x) + len(data.val.x) == len(photos["train"]) and len(data.test.x) == len(photos["test"])
    assert data.info.class_names == ["circle", "square", "stripes"]
    assert image_files(root / "test") == photos["test"] and expand_inputs([root / "test"]) == photos["test"]
    hidden = root / "test" / "circle" / "._0.png"
    assert expand_inputs([hidden]) == [hidden]  # a file named on the command line is read as asked


def _save(im, path, orientation: int | None = None):
    exif = im.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    im.save(path, exif=exif)
    return path


def test_partitions_keep_a_minimum_size_or_refuse():
    labels = np.repeat(np.arange(10), 30)
    for method, kw in (("iid", {}), ("dirichlet", {"alpha": 0.3}), ("by-group", {"groups": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]})):
        parts = partition(labels, 4, method, seed=2, min_size=40, **kw)
        assert min(len(p) for p in parts) >= 40 and sum(len(p) for p in parts) == 300
    with pytest.raises(PapmError, match="min-partition-size"):
        partition(labels, 4, "iid", min_size=80)
    with pytest.raises(PapmError, match="min-partition-size"):
        partition(labels, 10, "dirichlet", alpha=0.01, seed=0, min_size=25)
    with pytest.raises(PapmError, match="by-group-share"):  # share 1: the nodes of group 1 past the first get little
        partition(labels, 5, "by-group", groups=[[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]], share=1.0, min_size=40)


def test_a_config_whose_nodes_cannot_split_the_data_stops_before_any_node_starts(tmp_path, monkeypatch):
    """One line from the coordinator (the same partition every node would make), not one refusal per node."""
    import papm.simulations.direct as direct
    from papm.simulations.direct import run_direct

    monkeypatch.setattr(direct, "RunDriver", lambda *a, **k: pytest.fail("the run started"))
    cfg = RunConfig.from_overrides(["nodes=20", "partitioner=dirichlet", "dirichlet-alpha=0.01",
                                    f"run-dir={tmp_path / 'run'}"])
    with pytest.raises(PapmError, match="Dirichlet\\(alpha=0.01\\) left a node with fewer than min-partition-size=16"):
        run_direct(cfg)
    assert not (tmp_path / "run").exists()


def test_label_skew_measures_how_far_node_mixes_are_from_the_pooled_mix():
    assert label_skew(np.array([[5, 5], [10, 10], [0, 0]])) == 0.0  # same mix; an empty node does not count
    assert label_skew(np.array([[7, 0], [0, 3]])) == pytest.approx(1.0)  # no class shared, whatever the sizes
    assert label_skew(np.array([[7, 0, 0], [0, 3, 1]])) == pytest.approx(1.0)
    # pooled (0.4, 0.4, 0.2); node mixes 0.6, 0.6 and 2/15 from it, weighted by 12, 12, 36 samples: 0.32, over
    # the largest mean distance for these sizes, 1 - (0.2^2 + 0.2^2 + 0.6^2) = 0.56
    assert label_skew(np.array([[12, 0, 0], [0, 12, 0], [12, 12, 12]])) == pytest.approx(0.32 / 0.56)
    labels = np.repeat(np.arange(10), 300)

    def table(labels, nodes, method, **kw):  # nodes x classes counts of a partition
        return np.stack([np.bincount(labels[p], minlength=10) for p in partition(labels, nodes, method, seed=0, **kw)])

    iid = table(labels, 3, "iid")
    small = table(labels[::20], 5, "iid")  # 30 images a node: their mixes differ by chance alone
    skewed = table(labels, 3, "dirichlet", alpha=0.5)
    assert label_skew(iid) < 0.05 and not skew_is_real(iid)
    assert label_skew(small) > 0.1 and not skew_is_real(small)  # large by noise, not significant
    assert label_skew(skewed) > 0.4 and skew_is_real(skewed)


def test_run_inputs_come_from_the_checkpoint(tmp_path, base_ckpt):
    cfg = resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={base_ckpt}"]))
    assert (cfg.dataset, cfg.image_size, cfg.channels) == ("digits", 8, 1)  # the digits checkpoint's
    for key, value in (("image-size", "16"), ("channels", "3"), ("dataset", "cifar10")):
        with pytest.raises(PapmError, match=f"{key}={value} conflicts with base-checkpoint"):
            resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={base_ckpt}", f"{key}={value}"]))
    assert resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={base_ckpt}", "image-size=8"])).image_size == 8
    assert cfg.width == 0.125  # the checkpoint's (reported in summary.md), not the 0.25 default; another value is refused
    with pytest.raises(PapmError, match=r"width=0.5 conflicts with base-checkpoint .* \(width 0.125\)"):
        resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={base_ckpt}", "width=0.5"]))
    from papm.shared.checkpoint import load_checkpoint, save_checkpoint

    model, info, ckpt = load_checkpoint(base_ckpt)  # what `papm prune` writes: it would be reported as the unsplit base
    save_checkpoint(tmp_path / "pruned.pt", model, ckpt["model_args"], info, kind="pruned")
    with pytest.raises(PapmError, match=r"pruned.pt is a pruned checkpoint; give the base checkpoint it came from"):
        resolve_run_inputs(RunConfig.from_overrides([f"base-checkpoint={tmp_path / 'pruned.pt'}"]))
    plain = resolve_run_inputs(RunConfig())
    assert (plain.dataset, plain.image_size, plain.channels) == ("digits", 8, 1)
    tree = resolve_run_inputs(RunConfig.from_overrides(["dataset=imagefolder", "data-root=x"]))
    assert (tree.image_size, tree.channels) == (32, 3)
    for bad, needle in (("image-size=4", "image-size must be in [8, 512]"), ("image-size=513", "image-size must be in [8, 512]"),
                        ("channels=2", "channels must be 1"), ("base-lr=nan", "finite"), ("timeout=inf", "finite"),
                        ("finetune-nodes=some", "finetune-nodes must be"), ("bn=batch", "bn must be"),
                        ("fusion-head=mlp", "fusion-head must be fedavg, lda or auto"),
                        ("fusion-shrinkage=1.5", "fusion-shrinkage must be in [0, 1]"), ("fusion-shrinkage=nan", "finite")):
        with pytest.raises(PapmError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            RunConfig.from_overrides([bad])


def test_a_node_without_group_samples_adds_nothing_and_weighs_by_the_groups_classes(base_ckpt, digits):
    from papm.shared.checkpoint import load_checkpoint

    base, info, _ = load_checkpoint(base_ckpt)
    only_low = digits.train.of_classes([0, 1, 2])
    counts, n = local_apoz_counts(base, only_low, info, [7, 8], 64, seed=0)
    assert n == 0 and not counts.zeros  # nothing to count, no error
    counts, n = local_apoz_counts(base, digits.train, info, [7, 8], 64, seed=0)
    assert n == 64 and counts.zeros
    # FedAvg weight: class weights summed: emphasis for the group's classes, 1 for the rest
    y = torch.tensor([7, 7, 0, 1])
    assert objective_weight(y, 10, [7, 8], emphasis=4.0) == 4 + 4 + 1 + 1


def test_class_statistics_of_100_classes_in_bounded_memory():
    """20,000 samples x 100 classes: the old N x C x C outer products alone were 1.6 GB (twice)."""
    code = """
import resource, torch
from papm.shared.class_stats import ClassStatistics
torch.manual_seed(0)
logits, labels = torch.randn(20000, 100), torch.randint(0, 100, (20000,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = ClassStatistics.from_logits(logits, labels)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
p = torch.softmax(logits.double(), 1)
c = 7
ref = p[labels == c].T @ p[labels == c]
assert torch.allclose(stats.softmax_outer[c], ref) and int(stats.counts.sum()) == 20000
print(grew // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 400, f"class statistics grew the process by {r.stdout.strip()} MiB"


@pytest.mark.parametrize("size,channels,head", [(48, 3, "fedavg"), (16, 1, "lda")])
def test_devices_with_their_own_trees_end_to_end(tmp_path, size, channels, head):
    """Three devices, each with its own train/ tree; the coordinator holds the test split; the image
    shape and classes come from the base checkpoint; the run goes through every phase, with either head."""
    from papm.simulations.direct import run_direct

    root, base = pattern_base(tmp_path, size, channels)
    devices = [write_pattern_folder(tmp_path / f"dev{i}", per_class=10, size=size + 4 * i, channels=channels,
                                    parts=("train",), seed=10 + i) for i in range(3)]
    cfg = RunConfig.from_overrides([f"base-checkpoint={base}", f"data-root={root}", f"run-dir={tmp_path / 'run'}",
                                    "nodes=3", "devices=2", "finetune-epochs=1", "fusion-rounds=1", "budget=0.5",
                                    "min-partition-size=4", f"fusion-head={head}", "device=cpu"])
    run_direct(cfg, [{"partition-id": i, "num-partitions": 3, "data-root": str(d)} for i, d in enumerate(devices)])
    run = tmp_path / "run"
    assert json.loads((run / "state.json").read_text())["completed"] == list(PHASES)
    assert json.loads((run / "evaluation.json").read_text())["fusion"]["head"] == head
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [None, channels, size, size]
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["test_samples"] == 36 and ev["federated"]["nodes"] == 3 and ev["federated"]["samples"] > 0
    # papm infer reads any photo at the bundle's size, through the same resize
    from PIL import Image

    photo = tmp_path / "big.png"
    Image.fromarray(np.full((300, 200, 3), 128, np.uint8)).save(photo)
    r = run_papm("infer", run / "bundle", photo, "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["top_k"], r.stderr
    if channels == 1:  # the coordinator's data moved since: `papm export` says so in one line, and --data-root finds it
        root.rename(tmp_path / "moved")
        r = run_papm("export", run, "--out", tmp_path / "b2", cwd=tmp_path)
        assert r.returncode == 2 and "give --data-root" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
        assert not (tmp_path / "b2").exists()
        r = run_papm("export", run, "--out", tmp_path / "b2", "--data-root", tmp_path / "moved", cwd=tmp_path)
        assert r.returncode == 0 and (tmp_path / "b2" / "manifest.json").is_file(), r.stderr[-2000:]


def test_a_device_with_other_classes_is_refused_in_one_line(tmp_path):
    from papm.simulations.direct import run_direct

    root, base = pattern_base(tmp_path, 24, 3)
    good = write_pattern_folder(tmp_path / "dev0", per_class=8, parts=("train",))
    odd = write_pattern_folder(tmp_path / "dev1", classes=("circle", "square", "zigzag"), per_class=8, parts=("train",))
    cfg = RunConfig.from_overrides([f"base-checkpoint={base}", f"data-root={root}", f"run-dir={tmp_path / 'run'}",
                                    "nodes=2", "devices=2", "min-partition-size=4", "device=cpu"])
    with pytest.raises(PapmError) as e:
        run_direct(cfg, [{"partition-id": 0, "num-partitions": 2, "data-root": str(good)},
                         {"partition-id": 1, "num-partitions": 2, "data-root": str(odd)}])
    assert "partition-id 1 has classes ['circle', 'square', 'zigzag']" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "base.pt").exists()


def test_an_empty_test_folder_says_to_fill_or_remove_it(tmp_path):
    import shutil

    root = write_pattern_folder(tmp_path / "photos", per_class=4, size=16)
    shutil.rmtree(root / "test")
    (root / "test").mkdir()
    with pytest.raises(PapmError, match=r"photos/test holds no class folders; put each class's test images in "
                                        r"test/<class>/ \(the class folders of train/\), or remove the empty test/"):
        load_dataset("imagefolder", root, image_size=16)
    (root / "test").rmdir()  # as the fix says: then there is no test split
    assert len(load_dataset("imagefolder", root, image_size=16).test) == 0


def test_a_test_class_without_images_is_named_in_a_warning(tmp_path, capsys):
    from papm.cli import main

    root = write_pattern_folder(tmp_path / "photos", per_class=6, size=16)
    for f in (root / "test" / "square").iterdir():
        f.unlink()
    assert main(["train", "--dataset", "imagefolder", "--data-root", str(root), "--width", "0.125", "--epochs", "1",
                 "--batch-size", "8", "--quiet", "--out", str(tmp_path / "b.pt")]) == 0
    err = capsys.readouterr().err
    assert "warning: test/ holds no images of square: their test accuracy is not measured" in err
    assert "circle" not in err
    # a run's coordinator says the same when it meets its nodes (an unreachable budget then stops it there)
    import logging

    from papm.simulations.direct import run_direct

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        with pytest.raises(PapmError, match="budget=0.9999 cannot be met"):
            run_direct(RunConfig.from_overrides(["dataset=imagefolder", f"data-root={root}", "image-size=16", "nodes=2",
                                                 "devices=2", "min-partition-size=4", "width=0.125", "budget=0.9999",
                                                 f"run-dir={tmp_path / 'run'}"]))
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert "the coordinator's test split holds no images of square: their test accuracy is not measured" in seen


def test_an_empty_class_folder_is_refused_where_every_class_must_be_learnt(tmp_path):
    """A whole training tree (papm train, a simulation's shared data-root) with an empty class folder would give a
    model scoring a class it never saw: one line naming the folder. A device's own tree may lack some classes."""
    from papm.shared.node_data import load_node_data
    from papm.simulations.direct import run_direct

    root = write_pattern_folder(tmp_path / "photos", per_class=6, size=16)
    (root / "train" / "zebra").mkdir()
    (root / "test" / "zebra").mkdir()
    with pytest.raises(PapmError, match=r"photos/train has no images in class folder\(s\) zebra; add images"):
        load_dataset("imagefolder", root, image_size=16)
    r = run_papm("train", "--dataset", "imagefolder", "--data-root", root, "--image-size", "16", "--epochs", "1",
                 "--out", tmp_path / "b.pt", cwd=tmp_path)
    assert r.returncode == 2 and "zebra" in r.stderr.strip().splitlines()[-1] and not (tmp_path / "b.pt").exists()
    cfg = RunConfig.from_overrides(["dataset=imagefolder", f"data-root={root}", "image-size=16", "min-partition-size=4"])
    assert load_node_data(cfg, 0, 2, own_data_root=str(root)).info.class_names[-1] == "zebra"  # a device's own: fine
    # devices' own trees that together hold no zebra: the statistics phase names the class, not its index
    base_root, base = pattern_base(tmp_path / "b", 24, 3)
    trees = [write_pattern_folder(tmp_path / f"dev{i}", per_class=8, size=24, parts=("train",), seed=i) for i in range(2)]
    for d in trees:
        (d / "train" / "stripes").rename(d / "unused")
        (d / "train" / "stripes").mkdir()
    with pytest.raises(PapmError, match=r"no node holds training images of class\(es\) stripes \(of 2 nodes"):
        run_direct(RunConfig.from_overrides([f"base-checkpoint={base}", f"data-root={base_root}", "nodes=2", "devices=2",
                                             "min-partition-size=4", f"run-dir={tmp_path / 'run'}", "device=cpu"]),
                   [{"partition-id": i, "num-partitions": 2, "data-root": str(d)} for i, d in enumerate(trees)])


@pytest.mark.parametrize("finetune_nodes", ["all", "group"])
def test_nodes_without_group_samples_stay_in_the_run(tmp_path, finetune_nodes):
    """Device 0 holds only circles, device 1 only squares, device 2 all three classes: two devices hold
    no image of some group's classes. Nobody is evicted; APoZ counts come from the nodes that have
    samples; with finetune-nodes=group a node serving a group it has no image of still fine-tunes."""
    from papm.simulations.direct import run_direct

    root, base = pattern_base(tmp_path, 24, 3)
    trees = [write_pattern_folder(tmp_path / "dev0", classes=("circle",), per_class=12, parts=("train",), seed=3),
             write_pattern_folder(tmp_path / "dev1", classes=("circle", "square"), per_class=12, parts=("train",), seed=4),
             write_pattern_folder(tmp_path / "dev2", per_class=12, parts=("train",), seed=5)]
    for d in trees[:2]:  # the same class folders everywhere, some of them empty
        for name in ("circle", "square", "stripes"):
            (d / "train" / name).mkdir(parents=True, exist_ok=True)
    for f in (tmp_path / "dev1" / "train" / "circle").iterdir():
        f.unlink()
    cfg = RunConfig.from_overrides([f"base-checkpoint={base}", f"data-root={root}", f"run-dir={tmp_path / 'run'}",
                                    "nodes=3", "devices=3", "finetune-epochs=1", "fusion-rounds=1", "min-partition-size=4",
                                    f"finetune-nodes={finetune_nodes}", "device=cpu"])
    run_direct(cfg, [{"partition-id": i, "num-partitions": 3, "data-root": str(d)} for i, d in enumerate(trees)])
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == list(PHASES) and not state.get("failures")
    assignment = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("phase") == "assignment"][-1]
    assert assignment["label_skew"] == pytest.approx(0.32 / 0.56, abs=1e-4) and assignment["label_skewed"]
    assert "Label skew across the nodes' training data: 0.571" in (run / "summary.md").read_text()
    reports = [json.loads((run / "devices" / f"device-{g}" / "prune.json").read_text()) for g in range(3)]
    apoz_nodes = {r["class_names"][0]: r["apoz_nodes"] for r in reports}
    if finetune_nodes == "all":
        assert apoz_nodes == {"circle": 2, "square": 2, "stripes": 1}
    else:  # one node per group: the group's own node, with or without images of it
        assert set(apoz_nodes.values()) <= {0, 1}
