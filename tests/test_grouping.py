"""Class statistics, similarity, clustering and the group-assignment report."""

import csv
import json
import re

import numpy as np
import pytest
import torch

from papm.deploy.group_report import write_group_report
from papm.shared.grouping import (SIMILARITIES, analyse_groups, analyse_stats, balanced_groups, class_similarity,
                                  cluster_classes, confusion_within)
from papm.shared.checkpoint import load_checkpoint
from papm.shared.class_stats import ClassStatistics, compute_class_stats
from papm.shared.errors import PapmError
from papm.shared.partition import partition

from conftest import run_papm, write_imagefolder_for_cli


def test_federated_statistics_equal_the_centralised_ones(base_ckpt, digits):
    model, info, _ = load_checkpoint(base_ckpt)
    central = compute_class_stats(model, digits.train, info)
    parts = partition(digits.train.y.numpy(), 4, "dirichlet", alpha=0.5, seed=1)
    federated = ClassStatistics.zeros(info.num_classes)
    for idx in parts:
        # each node sends its sums as arrays (what travels in a Flower record) and the server adds them
        node = compute_class_stats(model, digits.train.subset(idx), info)
        federated = federated + ClassStatistics.from_arrays({k: v.numpy() for k, v in node.to_arrays().items()})
    assert torch.equal(federated.counts, central.counts)
    assert torch.equal(federated.confusion, central.confusion)
    for field in ("softmax_sum", "logit_sum", "softmax_outer", "logit_outer"):
        torch.testing.assert_close(getattr(federated, field), getattr(central, field), rtol=1e-9, atol=1e-9)
    assert int(central.counts.sum()) == len(digits.train)
    a = analyse_stats(central, info.class_names)
    b = analyse_stats(federated, info.class_names)
    assert a.partitions == b.partitions


def test_statistics_match_a_direct_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.2, 0.1, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    s = ClassStatistics.from_logits(logits, labels)
    p = torch.softmax(logits.double(), 1)
    torch.testing.assert_close(s.softmax_sum[1] / s.counts[1], (p[1] + p[2]) / 2)
    with pytest.raises(PapmError, match=r"no samples of classes \[2\]"):
        s.mean_outputs()
    torch.testing.assert_close(s.softmax_outer[0], torch.outer(p[0], p[0]) + torch.outer(p[3], p[3]))
    assert s.confusion.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]


def block_similarity(sizes, seed=0, inside=0.8, outside=0.1, noise=0.05):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[b] * n for b, n in enumerate(sizes)])
    perm = rng.permutation(len(labels))  # classes of one block are not adjacent
    labels = labels[perm]
    sim = np.where(labels[:, None] == labels[None, :], inside, outside) + rng.uniform(-noise, noise, (len(labels),) * 2)
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    blocks = sorted((sorted(np.flatnonzero(labels == b).tolist()) for b in range(len(sizes))), key=lambda g: g[0])
    return sim, blocks


@pytest.mark.parametrize("sizes", [(3, 3, 4), (2, 5), (4, 4, 4, 4)])
def test_known_block_structure_is_recovered(sizes):
    sim, blocks = block_similarity(sizes)
    assert cluster_classes(sim, len(sizes)) == blocks


def test_balanced_recovers_equal_blocks_and_keeps_sizes_within_one():
    sim, blocks = block_similarity((4, 4, 4), seed=3)
    assert balanced_groups(sim, 3) == blocks
    sim, _ = block_similarity((2, 7, 1), seed=4)
    for k in range(2, 11):
        groups = balanced_groups(sim, k)
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1, (k, sizes)
        assert sorted(c for g in groups for c in g) == list(range(10))


def test_balanced_sizes_within_one_for_every_k_on_a_real_model(base_ckpt, digits):
    model, info, _ = load_checkpoint(base_ckpt)
    stats = compute_class_stats(model, digits.train, info)
    analysis = analyse_stats(stats, info.class_names, balanced=True)
    assert sorted(analysis.partitions) == list(range(2, 11))
    for k, groups in analysis.partitions.items():
        sizes = [len(g) for g in groups]
        assert len(groups) == k and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("kind", SIMILARITIES)
def test_every_similarity_is_symmetric_with_unit_diagonal(base_ckpt, digits, kind):
    model, info, _ = load_checkpoint(base_ckpt)
    stats = compute_class_stats(model, digits.val, info)
    sim = class_similarity(kind, stats.mean_outputs().numpy(), stats.confusion.numpy(), stats.within_class_covariance().numpy())
    assert sim.shape == (10, 10) and np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
    assert np.isfinite(sim).all()


def test_confusable_classes_land_together():
    # classes 0 and 1 are confused with each other, 2 and 3 likewise: the model's outputs say so
    rows = torch.tensor([[3.0, 2.5, 0, 0], [2.5, 3.0, 0, 0], [0, 0, 3.0, 2.6], [0, 0, 2.6, 3.0]])
    # each class is mostly right, sometimes mistaken for its partner
    logits = torch.cat([rows.repeat(5, 1), rows[[1, 0, 3, 2]]])
    labels = torch.tensor([0, 1, 2, 3]).repeat(6)
    stats = ClassStatistics.from_logits(logits + 0.1 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)), labels)
    for kind in SIMILARITIES:
        a = analyse_stats(stats, list("abcd"), similarity=kind)
        assert a.partitions[2] == [[0, 1], [2, 3]], kind


def test_confusion_share():
    conf = np.array([[10, 3, 1], [2, 10, 0], [0, 4, 10]])
    assert confusion_within(conf, [[0, 1], [2]]) == pytest.approx(5 / 10)


@pytest.mark.parametrize("k", [1, 11])
def test_bad_k_is_a_clear_error(k):
    sim, _ = block_similarity((5, 5))
    with pytest.raises(PapmError, match=f"K={k} .* between 2 and 10"):
        cluster_classes(sim, k)


def test_report_files(tmp_path):
    sim, blocks = block_similarity((3, 3, 4))
    names = [f"class-{i}" for i in range(10)]
    conf = np.eye(10, dtype=int) * 50 + 1
    analysis = analyse_groups(names, np.eye(10), conf, np.full(10, 51), similarity="correlation")
    analysis.similarity = sim  # report what a known similarity gives
    analysis.partitions = {k: cluster_classes(sim, k) for k in range(2, 11)}
    nodes = [{"node": 101, "partition_id": 0, "group": 0, "class_counts": list(range(10))},
             {"node": 202, "partition_id": 1, "group": 1, "class_counts": [5] * 10},
             {"node": 303, "partition_id": 2, "group": 2, "class_counts": [1] * 10}]
    paths = write_group_report(tmp_path, analysis, {"chosen_k": 3, "nodes": nodes})
    rows = list(csv.DictReader(open(paths["groups.csv"])))
    assert [int(r["k"]) for r in rows] == list(range(2, 11))
    doc = json.loads(paths["groups.json"].read_text())
    assert doc["classes"] == names and doc["partitions"]["3"] == blocks and doc["balanced"] is False
    assert len(doc["similarity"]) == 10
    page = paths["report.html"].read_text()
    for name in names:
        assert name in page
    for k in range(2, 11):  # one table row per K (the row starts with K, then its groups)
        assert re.search(rf"<tr( class=chosen)?><td>{k}</td><td><span class=g>", page), k
    assert "data:image/png;base64," in page and "This run: K = 3" in page
    assignment = json.loads(paths["assignment.json"].read_text())
    assert assignment["nodes"]["202"] == {"group": 1, "partition_id": 1}
    assert assignment["groups"]["2"]["classes"] == blocks[2]
    assert paths["similarity.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_papm_groups_cli(tmp_path, base_ckpt):
    r = run_papm("groups", base_ckpt, "--dataset", "digits", "--out", "groups", "--balanced", "--k", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "report.html" in r.stdout and "\n 3 " in r.stdout
    out = tmp_path / "groups"
    rows = list(csv.DictReader(open(out / "groups.csv")))
    assert len(rows) == 9 and all(max(map(int, r["sizes"].split(","))) - min(map(int, r["sizes"].split(","))) <= 1 for r in rows)
    doc = json.loads((out / "groups.json").read_text())
    assert doc["balanced"] is True and doc["split"] == "train" and doc["chosen_k"] == 3
    page = (out / "report.html").read_text()
    assert all(re.search(rf"<tr( class=chosen)?><td>{k}</td><td><span class=g>", page) for k in range(2, 11))
    # outside a run --k only highlights that K: no run section, no assignment
    assert "Chosen: K = 3" in page and "This run" not in page and not (out / "assignment.json").exists()
    # running again without --force keeps the report
    before = (out / "groups.csv").read_bytes()
    r = run_papm("groups", base_ckpt, "--out", "groups", cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "groups.csv").read_bytes() == before


def _error_line(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("k", ["1", "11"])
def test_groups_cli_bad_k(tmp_path, base_ckpt, k):
    line = _error_line(run_papm("groups", base_ckpt, "--k", k, "--out", "g", cwd=tmp_path))
    assert f"K={k}" in line and "between 2 and 10" in line


def test_groups_cli_class_count_mismatch(tmp_path, base_ckpt, digits):
    root = write_imagefolder_for_cli(tmp_path / "tree", digits)
    line = _error_line(run_papm("groups", base_ckpt, "--dataset", "imagefolder", "--data-root", root, "--out", "g", cwd=tmp_path))
    assert "10 classes" in line and "has 3" in line


def test_groups_cli_refuses_test_split_and_unknown_similarity(tmp_path, base_ckpt):
    assert "never use the test split" in _error_line(run_papm("groups", base_ckpt, "--split", "test", cwd=tmp_path))
    assert "unknown similarity 'euclid'" in _error_line(run_papm("groups", base_ckpt, "--similarity", "euclid", cwd=tmp_path))
