"""Class statistics, similarity, clustering and the group-assignment report."""

import csv
import json
import re

import numpy as np
import pytest
import torch

from papm.shared.group_report import write_group_report
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


def _mean_outputs(seed=0, c=5):
    """Class-mean softmax outputs of C classes (rows sum to 1), not centred, all different."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.0, 1.0, (c, c)) + 2.0 * np.eye(c)
    return m / m.sum(1, keepdims=True)


def test_correlation_similarity_is_pearson_of_the_class_mean_outputs():
    m = _mean_outputs()
    np.testing.assert_allclose(class_similarity("correlation", m), np.corrcoef(m), rtol=0, atol=1e-12)
    # a class whose mean output is flat (no preference) gives finite similarities, not nan
    m[2] = 1.0 / 5
    sim = class_similarity("correlation", m)
    assert np.isfinite(sim).all() and np.allclose(np.delete(sim[2], 2), 0.0)


def test_cosine_similarity_is_the_normalised_dot_product():
    m = _mean_outputs(seed=1)
    for i in range(5):
        for j in range(5):
            if i != j:
                expected = m[i] @ m[j] / (np.linalg.norm(m[i]) * np.linalg.norm(m[j]))
                assert class_similarity("cosine", m)[i, j] == pytest.approx(expected, abs=1e-12), (i, j)
    # not centred: two different rows with only positive entries are never anti-similar
    assert (class_similarity("cosine", m) > 0).all()
    assert not np.allclose(class_similarity("cosine", m), class_similarity("correlation", m))


def test_confusion_similarity_is_the_symmetrised_confusion_rate():
    # rows: true class (10, 10 and 20 samples), columns: predicted class
    conf = np.array([[8, 2, 0], [1, 6, 3], [0, 4, 16]])
    sim = class_similarity("confusion", np.eye(3), confusion=conf)
    # (N_ij / n_i + N_ji / n_j) / 2, by hand
    assert sim[0, 1] == sim[1, 0] == pytest.approx((2 / 10 + 1 / 10) / 2)
    assert sim[1, 2] == sim[2, 1] == pytest.approx((3 / 10 + 4 / 20) / 2)
    assert sim[0, 2] == sim[2, 0] == 0.0
    with pytest.raises(PapmError, match="needs the confusion counts"):
        class_similarity("confusion", np.eye(3))


def test_covariance_similarity_measures_closeness_under_the_within_class_covariance():
    # class 1 is 3 away from class 0 along an axis where outputs vary a lot (variance 100),
    # class 2 only 1 away along an axis of variance 1: Mahalanobis puts class 1 closer
    means = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    cov = np.diag([100.0, 1.0, 1.0])
    sim = class_similarity("covariance", means, within_covariance=cov)
    assert sim[0, 1] > sim[0, 2] > sim[1, 2]
    # exp(-d^2 / median d^2): d^2 = 0.09, 1 and 1.09, median of the off-diagonal entries 1
    np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], np.exp([-0.09, -1.0, -1.09]), rtol=1e-4)
    # with an isotropic covariance the nearer mean (class 2) is the more similar one
    iso = class_similarity("covariance", means, within_covariance=np.eye(3))
    assert iso[0, 2] > iso[0, 1]
    with pytest.raises(PapmError, match="within-class covariance"):
        class_similarity("covariance", means)


def test_every_similarity_of_a_real_model_is_finite_and_in_range(base_ckpt, digits):
    """Softmax outputs make the within-class covariance singular: no similarity may turn nan or leave its range."""
    model, info, _ = load_checkpoint(base_ckpt)
    stats = compute_class_stats(model, digits.val, info)
    m, conf, cov = stats.mean_outputs().numpy(), stats.confusion.numpy(), stats.within_class_covariance().numpy()
    low = {"correlation": -1.0, "cosine": 0.0, "covariance": 0.0, "confusion": 0.0}
    for kind in SIMILARITIES:
        sim = class_similarity(kind, m, conf, cov)
        off = sim[~np.eye(10, dtype=bool)]
        assert np.isfinite(sim).all() and (off >= low[kind] - 1e-9).all() and (off <= 1.0 + 1e-9).all(), kind
        assert off.max() < 1.0 - 1e-6, kind  # distinct classes are never identical
    np.testing.assert_allclose(class_similarity("correlation", m, conf, cov), np.corrcoef(m), atol=1e-12)


def test_unknown_similarity_is_a_clear_error():
    with pytest.raises(PapmError, match="unknown similarity 'euclid'"):
        class_similarity("euclid", np.eye(3))


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


def _block_outputs(sizes=(3, 3, 4), seed=0):
    """Class-mean outputs of classes confused within blocks (not adjacent), and the blocks."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.concatenate([[b] * n for b, n in enumerate(sizes)]))
    c = len(labels)
    m = np.where(labels[:, None] == labels[None, :], 0.3, 0.02) + 0.5 * np.eye(c) + rng.uniform(0, 0.02, (c, c))
    blocks = sorted((sorted(np.flatnonzero(labels == b).tolist()) for b in range(len(sizes))), key=lambda g: g[0])
    return m / m.sum(1, keepdims=True), blocks


def test_report_files_hold_the_analysis_they_are_given(tmp_path):
    names = [f"class-{i}" for i in range(10)]
    means, blocks = _block_outputs()
    conf = np.eye(10, dtype=int) * 50 + 1
    conf[0, 1] = 7
    counts = conf.sum(1)
    analysis = analyse_groups(names, means, conf, counts, similarity="correlation")
    assert analysis.partitions[3] == blocks  # a real structure, not one group per K
    nodes = [{"node": 101, "partition_id": 0, "group": 0, "class_counts": list(range(10))},
             {"node": 202, "partition_id": 1, "group": 1, "class_counts": [5] * 10},
             {"node": 303, "partition_id": 2, "group": 2, "class_counts": [1] * 10}]
    paths = write_group_report(tmp_path, analysis, {"chosen_k": 3, "nodes": nodes})
    assert set(paths) == {"groups.csv", "groups.json", "similarity.png", "report.html", "assignment.json"}

    # groups.csv: one row per K, holding that K's groups (by class name), sizes and scores
    rows = list(csv.DictReader(open(paths["groups.csv"])))
    assert [int(r["k"]) for r in rows] == sorted(analysis.partitions) == list(range(2, 11))
    for r in rows:
        k = int(r["k"])
        groups = [[names.index(n) for n in g.split(", ")] for g in r["groups"].split(" | ")]
        assert groups == analysis.partitions[k], k
        assert [int(n) for n in r["sizes"].split(",")] == [len(g) for g in analysis.partitions[k]]
        for column, values in (("mean_within_similarity", analysis.mean_within), ("confusion_within", analysis.confusion_share)):
            if np.isnan(values[k]):  # K = 10: no two classes share a group
                assert k == 10 and r[column] == "", (k, column)
            else:
                assert float(r[column]) == pytest.approx(values[k], abs=5e-5), (k, column)

    # groups.json: the same partitions, similarity and statistics
    doc = json.loads(paths["groups.json"].read_text())
    assert doc["classes"] == names and doc["balanced"] is False and doc["chosen_k"] == 3
    assert doc["similarity_kind"] == "correlation"
    assert {int(k): g for k, g in doc["partitions"].items()} == analysis.partitions
    np.testing.assert_allclose(doc["similarity"], analysis.similarity, atol=1e-6)
    assert doc["confusion"] == conf.tolist() and doc["class_counts"] == counts.tolist()
    for k in range(2, 10):
        assert doc["mean_within_similarity"][str(k)] == pytest.approx(analysis.mean_within[k], abs=1e-6)
        assert doc["confusion_within"][str(k)] == pytest.approx(analysis.confusion_share[k], abs=1e-6)
    assert doc["mean_within_similarity"]["10"] is None  # nan is written as null, not as invalid JSON
    assert sorted(doc["leaf_order"]) == list(range(10))

    # assignment.json: the run's nodes and the groups of the chosen K
    assignment = json.loads(paths["assignment.json"].read_text())
    assert assignment["k"] == 3
    assert assignment["nodes"] == {str(n["node"]): {"group": n["group"], "partition_id": n["partition_id"]} for n in nodes}
    assert assignment["groups"] == {str(g): {"classes": cls, "class_names": [names[c] for c in cls]}
                                    for g, cls in enumerate(analysis.partitions[3])}

    page = paths["report.html"].read_text()
    for name in names:
        assert name in page
    for k in range(2, 11):  # one table row per K (the row starts with K, then its groups)
        assert re.search(rf"<tr( class=chosen)?><td>{k}</td><td><span class=g>", page), k
    assert re.search(r"<tr class=chosen><td>3</td>", page) and len(re.findall("<tr class=chosen>", page)) == 1
    assert "data:image/png;base64," in page and "This run: K = 3" in page
    assert paths["similarity.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # outside a run: no assignment, and the page does not claim one
    out = tmp_path / "plain"
    paths = write_group_report(out, analysis, chosen_k=4)
    assert "assignment.json" not in paths and not (out / "assignment.json").exists()
    assert json.loads(paths["groups.json"].read_text())["chosen_k"] == 4
    assert "This run" not in paths["report.html"].read_text()


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
