"""Small units the federation relies on: FedAvg, node assignment, message attribution, seeded training."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from papm.server.fedavg import weighted_average
from papm.server.messaging import exchange
from papm.server.phases.assignment import assign_nodes
from papm.shared.errors import PapmError
from papm.shared.models import ResNet18
from papm.shared.training import TrainSettings, fit

# ---- FedAvg ---------------------------------------------------------------------------------


def test_weighted_average_is_the_example_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]], dtype=torch.float64)}
    b = {"w": torch.tensor([5.0, 10.0]), "b": torch.tensor([[4.0]], dtype=torch.float64)}
    c = {"w": torch.tensor([-3.0, 0.0]), "b": torch.tensor([[-8.0]], dtype=torch.float64)}
    out = weighted_average([a, b, c], [1, 3, 4])
    # by hand: (1 * 1 + 3 * 5 + 4 * -3) / 8 = 0.5, (2 + 30 + 0) / 8 = 4, (0 + 12 - 32) / 8 = -2.5
    assert out["w"].tolist() == [0.5, 4.0] and out["w"].dtype == torch.float32
    assert out["b"].tolist() == [[-2.5]] and out["b"].dtype == torch.float64
    # the inputs are left as they were
    assert a["w"].tolist() == [1.0, 2.0]


def test_weighted_average_rounds_integer_buffers_and_keeps_their_dtype():
    bns = [torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)]
    bns[0].running_mean.fill_(1.0)
    bns[1].running_mean.fill_(3.0)
    bns[0].num_batches_tracked.fill_(10)
    bns[1].num_batches_tracked.fill_(11)
    out = weighted_average([bn.state_dict() for bn in bns], [1, 3])
    assert out["num_batches_tracked"].dtype == torch.int64
    assert int(out["num_batches_tracked"]) == 11  # (10 + 33) / 4 = 10.75: rounded, not truncated
    assert out["running_mean"].tolist() == [2.5, 2.5]
    merged = torch.nn.BatchNorm2d(2)
    merged.load_state_dict(out)  # a state dict the model takes as it is
    assert int(merged.num_batches_tracked) == 11


def test_weighted_average_refuses_mismatched_states_and_no_weight():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    with pytest.raises(PapmError, match="different architectures"):
        weighted_average([a, {"w": torch.zeros(3)}], [1, 1])  # a key missing
    with pytest.raises(PapmError, match="different architectures"):
        weighted_average([a, {"w": torch.zeros(4), "n": torch.tensor(1)}], [1, 1])  # a shape differs
    with pytest.raises(PapmError, match="no training examples"):
        weighted_average([a, copy.deepcopy(a)], [0, 0])
    with pytest.raises(PapmError, match="no node returned weights"):
        weighted_average([], [])


# ---- assignment of nodes to device groups -----------------------------------------------------

GROUPS = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]


def counts_mostly(group, total=100, share=0.8, seed=0):
    """Per-class sample counts: ``share`` of ``total`` in ``group``'s classes, the rest elsewhere."""
    rng = np.random.default_rng(seed)
    own = GROUPS[group]
    others = [c for c in range(10) if c not in own]
    counts = np.zeros(10, dtype=np.int64)
    counts[own] = rng.multinomial(int(total * share), [1 / len(own)] * len(own))
    counts[others] = rng.multinomial(total - int(total * share), [1 / len(others)] * len(others))
    return counts


def test_each_node_serves_the_group_its_data_is_mostly_from():
    owner = {10: 0, 11: 1, 12: 2, 13: 0, 14: 2, 15: 1, 16: 0}  # partition id -> the group it holds most of
    mapping = assign_nodes({pid: counts_mostly(g, seed=pid) for pid, g in owner.items()}, GROUPS)
    assert mapping == owner


def test_balance_wins_over_affinity_but_keeps_the_best_fitting_nodes():
    # five nodes all mostly of group 0; two groups: group 0 gets at most three, the three that fit it best
    shares = {0: 0.6, 1: 0.9, 2: 0.55, 3: 0.8, 4: 0.7}
    mapping = assign_nodes({pid: counts_mostly(0, total=1000, share=s, seed=pid) for pid, s in shares.items()}, GROUPS[:2])
    assert mapping == {0: 1, 1: 0, 2: 1, 3: 0, 4: 0}


@pytest.mark.parametrize("n", [3, 4, 7, 10, 11])
def test_every_group_gets_floor_or_ceil_of_n_over_k_nodes(n):
    rng = np.random.default_rng(n)
    counts = {pid: rng.integers(0, 50, 10) for pid in range(100, 100 + n)}
    counts[100 + n - 1] = np.zeros(10, dtype=np.int64)  # a node without data is still assigned
    mapping = assign_nodes(counts, GROUPS)
    assert sorted(mapping) == sorted(counts)
    sizes = [sum(1 for g in mapping.values() if g == k) for k in range(3)]
    assert sorted(sizes) == sorted([n // 3 + (1 if i < n % 3 else 0) for i in range(3)]), sizes


def test_fewer_nodes_than_groups_is_a_clear_error():
    with pytest.raises(PapmError, match="3 device groups need at least 3 nodes, but only 2"):
        assign_nodes({0: counts_mostly(0), 1: counts_mostly(1)}, GROUPS)


# ---- message exchange: replies and failures attributed to the right node -------------------------


@pytest.fixture
def task_identity(monkeypatch):
    """Messages are stamped with the identity of the task that creates them (the ServerApp here)."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Answers as ``behaviour[node_id]`` says: "ok", "error" (an error reply sent by the SuperLink, node 0),
    "late" (a good reply on the second pull), "silent" (never answers) or "refused" (not accepted)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.waiting: dict[str, list] = {}
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            msg.metadata.__dict__["_message_id"] = mid  # set on the object, as the real grids do
            kind = self.behaviour[msg.metadata.dst_node_id]
            if kind == "refused":
                ids.append(None)
                continue
            ids.append(mid)
            if kind in ("ok", "late"):
                value = msg.content["q"]["x"]
                reply = Message(RecordDict({"a": ConfigRecord({"x": value * 10})}), reply_to=msg)
                self.waiting[mid] = [reply, 1 if kind == "ok" else 2]
            elif kind == "error":
                reply = Message(Error(code=3, reason="node crashed\nTraceback ...\nMessage: out of memory"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 0  # errors come from the SuperLink, not from the node
                self.waiting[mid] = [reply, 1]
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        return [self.waiting.pop(m)[0] for m in ids if m in self.waiting and self.waiting[m][1] <= self.pulls]


def _requests(nodes):
    return {n: RecordDict({"q": ConfigRecord({"x": n})}) for n in nodes}


def test_exchange_attributes_replies_and_failures_to_their_nodes(task_identity):
    behaviour = {101: "ok", 102: "silent", 103: "error", 104: "refused", 105: "late", 106: "ok"}
    grid = FakeGrid(behaviour)
    result = exchange(grid, _requests(behaviour), "query", timeout=0.3, group_id="g")
    assert sorted(result.replies) == [101, 105, 106]
    for n in (101, 105, 106):  # each node's own answer
        assert result.replies[n].content["a"]["x"] == n * 10
    assert set(result.failed) == {102, 103, 104}
    assert result.failed[102] == "no reply within 0.3 s"
    assert result.failed[103] == "error 3: out of memory"  # the node it was sent to, in one line
    assert "could not be delivered" in result.failed[104]


def test_exchange_returns_as_soon_as_every_node_answered(task_identity):
    import time

    grid = FakeGrid({1: "ok", 2: "ok"})
    t = time.monotonic()
    result = exchange(grid, _requests([1, 2]), "query", timeout=30)
    assert time.monotonic() - t < 5 and grid.pulls == 1
    assert sorted(result.replies) == [1, 2] and not result.failed


def test_replies_come_back_in_partition_order_whatever_order_they_arrive_in(task_identity, tmp_path):
    """FedAvg sums the replies in the order send() returns them: arrival order would make two runs of one config
    differ in the last bits of every average (and, rounds later, in a test image or two)."""
    from papm.server.driver import RunDriver
    from papm.shared.config import RunConfig

    # node ids are Flower's random draws; partition 0 sits on the largest id and answers last
    grid = FakeGrid({907: "late", 12: "ok", 455: "ok"})
    d = RunDriver(grid, RunConfig(run_dir=str(tmp_path / "run"), timeout=5), resume=False)
    d.nodes = {12: {"partition_id": 2}, 455: {"partition_id": 1}, 907: {"partition_id": 0}}
    replies = d.send("base", "query", _requests([12, 455, 907]))
    assert list(replies) == [907, 455, 12]
    assert [r["a"]["x"] for r in replies.values()] == [9070, 4550, 120]
    assert d.group_nodes({"k": 2, "partition_group": {2: 0, 0: 0, 1: 1}}) == {0: [907, 12], 1: [455]}


# ---- seeded training --------------------------------------------------------------------------


def test_fit_with_the_same_seed_gives_bitwise_identical_weights(digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        init = ResNet18(10, 1, 0.125)
        data = digits.train.subset(range(192))

        def trained(seed):
            model = copy.deepcopy(init)
            fit(model, data, digits.info, TrainSettings(epochs=1, batch_size=64, seed=seed), "cpu", progress=False)
            return model.state_dict()

        a, b, other = trained(3), trained(3), trained(4)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], init.state_dict()["conv1.weight"])  # it did train
    assert not all(torch.equal(a[k], other[k]) for k in a)  # and the seed matters


def test_evaluating_a_model_leaves_it_in_its_mode_and_place(digits):
    """The server evaluates its own copies of the models; evaluation must not switch them to eval mode (or move
    them to the GPU) behind the caller's back: on a GPU server that broke the prune phase's parameter count."""
    from papm.shared.training import evaluate

    torch.manual_seed(0)
    model = ResNet18(10, 1, 0.125).train()
    place = next(model.parameters()).device
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, digits.test, digits.info, "cpu")
    assert model.training and all(m.training for m in model.modules())
    assert next(model.parameters()).device == place
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # and BN statistics are untouched


def test_a_node_with_a_skewed_class_mix_trains_a_head_for_everyones_mix():
    """Label skew (Dirichlet partitions): a node holding 9 images of class 0 for each of class 1 teaches a plain
    head that class 1 is rare; with the logit shift of its mix against all nodes' (balanced) mix, the head it
    returns decides as if it had seen the balanced data."""
    from papm.shared.fusion import FusionHead, fit_head
    from papm.shared.training import label_shift

    gen = torch.Generator().manual_seed(0)

    def draw(n0, n1):  # two overlapping 1-D classes: N(-1, 1) and N(+1, 1)
        x = torch.cat([torch.randn(n0, 1, generator=gen) - 1, torch.randn(n1, 1, generator=gen) + 1])
        return x, torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])

    x, y = draw(1800, 200)
    test_x, test_y = draw(2000, 2000)
    shift = label_shift(torch.bincount(y, minlength=2), torch.tensor([5000, 5000]))
    assert torch.allclose(shift, torch.tensor([0.9, 0.1]).log() - torch.tensor(0.5).log(), atol=1e-5)

    def recall_of_class_1(shifted: bool) -> float:
        torch.manual_seed(0)
        head = FusionHead([1], 2, hidden=0)
        fit_head(head, x, y, epochs=30, lr=0.05, logit_shift=shift if shifted else None)
        with torch.no_grad():
            pred = head(test_x).argmax(1)
        return float((pred[test_y == 1] == 1).float().mean())

    plain, adjusted = recall_of_class_1(False), recall_of_class_1(True)
    assert plain < 0.6 and adjusted > 0.78, (plain, adjusted)

    # the same mix as everyone's: no shift; a class the node lacks: pushed out of its loss, not taught as rare
    assert torch.allclose(label_shift(torch.tensor([10, 30]), torch.tensor([100, 300])), torch.zeros(2), atol=1e-6)
    assert label_shift(torch.tensor([5, 5, 0]), torch.tensor([10, 10, 10]))[2] < -10


def test_lda_head_from_skewed_nodes_sums_is_the_lda_of_all_their_data():
    """fusion-head=lda: three nodes with disjoint-ish class mixes send per-class sums and Gram matrices; the head
    fitted from their totals equals the one fitted on all the features in one place, and (without shrinkage) its
    logits are scikit-learn's LDA decision function of the raw features (LDA is invariant to the standardisation)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from papm.shared.fusion import FusionHead, class_feature_sums, fit_lda_head

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=gen) * 2
    mix = torch.randn(6, 6, generator=gen)
    labels = torch.randint(0, 4, (900,), generator=gen)
    feats = (centres[labels] + torch.randn(900, 6, generator=gen) @ mix).relu() + 3  # skewed, non-zero-mean, like pooled ReLU features
    order = torch.argsort(labels * 1000 + torch.randperm(900, generator=gen))  # label-sorted: each node sees 1-2 classes
    parts = [class_feature_sums(feats[i], labels[i], 4) for i in order.chunk(3)]
    assert [int((p["class-count"] > 0).sum()) for p in parts] != [4, 4, 4]
    total = {k: sum(p[k] for p in parts) for k in parts[0]}
    whole = class_feature_sums(feats, labels, 4)

    def head_from(sums, shrinkage):
        head = FusionHead([4, 2], 4, hidden=0)
        fit_lda_head(head, sums["class-sum"], sums["class-count"], sums["gram"], shrinkage)
        return head

    test = (centres[labels[:200]] + torch.randn(200, 6, generator=gen) @ mix).relu() + 3
    for shrinkage in (0.0, 0.1):
        federated, central = head_from(total, shrinkage), head_from(whole, shrinkage)
        with torch.no_grad():
            assert torch.allclose(federated(test), central(test), rtol=1e-4, atol=1e-3)
    lda = LinearDiscriminantAnalysis(solver="lsqr").fit(feats.double().numpy(), labels.numpy())
    with torch.no_grad():
        ours = head_from(total, 0.0)(test).double()
    assert np.allclose(ours.log_softmax(1).numpy(), lda.predict_log_proba(test.double().numpy()), rtol=1e-3, atol=1e-3)
    assert float((ours.argmax(1) == labels[:200]).float().mean()) > 0.7  # 4 classes: chance is 0.25

    # a class no node has an image of is never predicted; a non-linear head and a bad shrinkage are refused
    missing = {k: v.clone() for k, v in whole.items()}
    missing["class-sum"][3], missing["class-count"][3] = 0, 0
    with torch.no_grad():
        assert (head_from(missing, 0.01)(test).argmax(1) != 3).all()
    with pytest.raises(PapmError, match="LDA head is linear"):
        fit_lda_head(FusionHead([6], 4, hidden=8), whole["class-sum"], whole["class-count"], whole["gram"], 0.01)
    with pytest.raises(PapmError, match="shrinkage must be in"):
        head_from(whole, 1.5)


def test_a_node_with_a_skewed_class_mix_fine_tunes_for_everyones_mix():
    """finetune-logit-adjust: the same shift in the fine-tuning loss (``fit``) of a specialist. A node with 9
    images of class 0 for each of class 1 fine-tunes a model that calls most class-1 images class 0; shifted by
    its mix against all working nodes' (balanced) mix, the model it returns decides as on balanced data."""
    from papm.shared.datasets import DatasetInfo, ImageSet
    from papm.shared.inference import predict_logits
    from papm.shared.training import TrainSettings, fit, label_shift

    gen = torch.Generator().manual_seed(0)
    info = DatasetInfo("skew", ["dark", "light"], 1, 2, [0.5], [0.25], hflip=False, crop_padding=0)

    def draw(n0, n1):  # 2x2 grey images of two overlapping brightness classes
        level = torch.cat([torch.full((n0,), 108.0), torch.full((n1,), 148.0)])
        x = (level[:, None] + 40 * torch.randn(n0 + n1, 4, generator=gen)).clamp(0, 255).round().to(torch.uint8)
        return ImageSet(x.view(-1, 1, 2, 2), torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)]))

    train, test = draw(1800, 200), draw(2000, 2000)
    shift = label_shift(torch.bincount(train.y, minlength=2), torch.tensor([4000, 4000]))

    def recall_of_class_1(shifted: bool) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        fit(model, train, info, TrainSettings(epochs=0, steps=300, batch_size=64, lr=0.05, select_on_val=False),
            logit_shift=shift if shifted else None, progress=False)
        pred = predict_logits(model, test, info, "cpu").argmax(1)
        return float((pred[test.y == 1] == 1).float().mean())

    plain, adjusted = recall_of_class_1(False), recall_of_class_1(True)
    assert plain < 0.6 and adjusted > 0.75, (plain, adjusted)


def test_scaffold_control_variates_bring_fedavg_back_to_the_centralised_model():
    """finetune-scaffold: two label-skewed nodes whose own optima differ, many local steps per round. Plain FedAvg
    ends away from the model trained on both nodes' data in one place (client drift); with the server's control
    variates (``c - c_i`` added to each node's gradients) it ends several times closer."""
    from papm.server.fedavg import scaffold_controls, scaffold_correction, weighted_average
    from papm.shared.datasets import DatasetInfo, ImageSet
    from papm.shared.training import TrainSettings, fit, momentum_lr_sum

    gen = torch.Generator().manual_seed(0)
    info = DatasetInfo("skew", ["dark", "light"], 1, 2, [0.5], [0.25], hflip=False, crop_padding=0)

    def draw(n0, n1, offset):  # 2x2 grey images of two overlapping brightness classes, shifted per node
        level = torch.cat([torch.full((n0,), 108.0), torch.full((n1,), 148.0)])
        x = (level[:, None] + torch.tensor(offset) + 40 * torch.randn(n0 + n1, 4, generator=gen)).clamp(0, 255).round()
        return ImageSet(x.to(torch.uint8).view(-1, 1, 2, 2),
                        torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)]))

    nodes = [draw(900, 100, [30.0, -30.0, 0.0, 0.0]), draw(100, 900, [-30.0, 30.0, 0.0, 0.0])]
    rounds, steps = 10, 40

    def new_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))

    central = new_model()
    both = ImageSet(torch.cat([n.x for n in nodes]), torch.cat([n.y for n in nodes]))
    fit(central, both, info, TrainSettings(epochs=0, steps=2 * rounds * steps, lr=0.05, batch_size=50, warmup=0,
                                           select_on_val=False), progress=False)

    def federated(scaffold: bool):
        model, controls = new_model(), {}
        for r in range(rounds):
            before = {k: p.detach().clone() for k, p in model.named_parameters()}
            returned, lr_sums = {}, {}
            for i, data in enumerate(nodes):
                local = new_model()
                local.load_state_dict(model.state_dict())
                settings = TrainSettings(epochs=0, steps=steps, lr=0.05, batch_size=50, warmup=0, select_on_val=False,
                                         seed=10 * r + i, schedule_total=steps * rounds, schedule_start=steps * r)
                fit(local, data, info, settings, grad_correction=scaffold_correction(controls, i) if scaffold else None,
                    progress=False)
                returned[i], lr_sums[i] = local.state_dict(), momentum_lr_sum(settings, steps)
            model.load_state_dict(weighted_average(list(returned.values()), [1.0, 1.0]))
            if scaffold:
                controls = scaffold_controls(before, returned, lr_sums, {0: 1.0, 1: 1.0}, controls)
        return model

    def distance(a, b):
        return float(sum(((a.state_dict()[k] - b.state_dict()[k]) ** 2).sum() for k in a.state_dict()) ** 0.5)

    fedavg, scaffold = distance(federated(False), central), distance(federated(True), central)
    assert scaffold < fedavg / 3, (fedavg, scaffold)
    assert scaffold_correction({}, 0) is None  # before the first round there is nothing to correct


def test_weighted_average_stops_a_run_whose_nodes_diverged():
    good = {"w": torch.ones(3), "n": torch.tensor(2)}
    bad = {"w": torch.tensor([1.0, float("nan"), 1.0]), "n": torch.tensor(2)}
    with pytest.raises(PapmError, match="averaged w holds NaN or infinite values: training diverged"):
        weighted_average([good, bad], [1, 1])


# ---- the simulation's worker layout -----------------------------------------------------------


@pytest.mark.parametrize("cpus,nodes,size,expected", [
    (2, 3, 32, 2),   # 3 nodes on 2 cores: one 2-thread worker (3 turns at ~1.8x) beats 2 workers that leave a core idle
    (2, 5, 32, 2),   # the same with 5 nodes (2, 2, 1 turns would waste half a turn)
    (2, 3, 8, 1),    # 8x8 images: a second thread barely helps, two workers finish first
    (2, 2, 32, 1),   # as many nodes as cores: one node per core
    (2, 4, 32, 1),
    (1, 7, 32, 1),
    (16, 3, 32, 5),  # few nodes on many cores: every core works (3 workers of 5 threads, not 3 single threads)
    (16, 64, 32, 1),
])
def test_simulated_nodes_get_the_threads_that_finish_an_exchange_first(cpus, nodes, size, expected):
    from papm.simulations.simulate import cpus_per_node, thread_scaling

    c = cpus_per_node(cpus, nodes, thread_scaling(size))
    assert c == expected
    assert 1 <= c <= cpus and cpus // c >= 1  # Flower's Ray backend keeps cpus // c workers, never none
