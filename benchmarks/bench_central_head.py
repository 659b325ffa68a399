"""Is it the extractors or the head? The fusion head of a finished simulated run, trained again on the same frozen
extractors, once centrally on all nodes' training images, once by FedAvg over the nodes' partitions as the run
does (with and without the logit shift), and as the closed-form LDA head (``fusion-head=lda``), each scored on the
run's test split, beside the base model and two ways of reading the specialists' own outputs with no head at all.

    python benchmarks/bench_central_head.py runs/bench-cifar/dirichlet-k2-n3 [--threads 2] [--per-class] [--shrinkage 0 0.1 0.3]

A simulation diagnostic: it reads every node's partition in one process (the run's config rebuilds them).
Each row also splits its test errors into those between classes of one group (the group's specialist sees both
classes) and those between groups (only the head can tell those apart).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from papm.server.run_directory import RunDirectory
from papm.shared.checkpoint import load_head
from papm.shared.datasets import normalise
from papm.shared.fusion import FusionHead, class_feature_sums, feature_sums, fit_head, fit_lda_head
from papm.shared.node_data import load_node_data, server_test_split
from papm.shared.training import label_shift


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished simulated run directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-class", action="store_true", help="also print each row's per-class test accuracy")
    ap.add_argument("--shrinkage", type=float, nargs="*", default=[], help="more LDA shrinkage values to score")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rd = RunDirectory(args.run)
    cfg = rd.read_config()
    base, info, _ = rd.load_base()
    extractors = [rd.load_extractor(g)[0].eval() for g in range(rd.load_assignment()["k"])]

    @torch.no_grad()
    def features(x):
        return torch.cat([torch.cat([e.features(normalise(x[i:i + 512], info)) for e in extractors], 1)
                          for i in range(0, len(x), 512)])

    nodes = [load_node_data(cfg, p, cfg.nodes) for p in range(cfg.nodes)]
    feats, labels = [features(n.train.x) for n in nodes], [n.train.y for n in nodes]
    for p, n in enumerate(nodes):  # the partition the extractors were fine-tuned on
        print(f"node {p}: training images per class {torch.bincount(n.train.y, minlength=info.num_classes).tolist()}")
    test = server_test_split(cfg).test
    test_feats = features(test.x)
    all_feats, all_labels = torch.cat(feats), torch.cat(labels)

    def new_head(hidden: int) -> FusionHead:
        torch.manual_seed(cfg.seed)
        head = FusionHead([e.feature_dim for e in extractors], info.num_classes, hidden)
        head.set_normalisation(*feature_sums(all_feats))
        return head

    def accuracy(head) -> torch.Tensor:
        """The head's test predictions (a row's accuracy and per-class accuracy are read from them)."""
        with torch.no_grad():
            return head.eval()(test_feats).argmax(1)

    @torch.no_grad()
    def logits(model) -> torch.Tensor:
        return torch.cat([model.eval()(normalise(test.x[i:i + 512], info)) for i in range(0, len(test.x), 512)])

    rows = {"run": accuracy(load_head(rd.path / "fusion" / "head.pt")[0])}
    # No head at all: each class scored by the specialist whose group holds it (its own classifier), and the
    # specialists' mean softmax. Where these match the heads below, the extractors, not the head, set the accuracy.
    groups = rd.load_assignment()["groups"]
    outputs = [logits(e) for e in extractors]
    rows["base model"] = logits(base).argmax(1)
    owner = {c: g for g, members in enumerate(groups) for c in members}
    rows["no head: each class's logit from the specialist of its group"] = torch.stack(
        [outputs[owner[c]][:, c] for c in range(info.num_classes)], 1).argmax(1)
    rows["no head: the specialists' mean softmax"] = sum(o.softmax(1) for o in outputs).argmax(1)
    for hidden, epochs in ((cfg.fusion_hidden, cfg.fusion_epochs), (cfg.fusion_hidden, 25), (0, 25)):
        head = new_head(hidden)
        fit_head(head, all_feats, all_labels, epochs=epochs, lr=cfg.fusion_lr, batch_size=cfg.batch_size, seed=cfg.seed)
        rows[f"central, hidden {hidden}, {epochs} epochs"] = accuracy(head)
    # the LDA head as the run makes it: each node's per-class sums and Gram matrix, summed
    sums = [class_feature_sums(f, y, info.num_classes) for f, y in zip(feats, labels)]
    total = [sum(s[k] for s in sums) for k in ("class-sum", "class-count", "gram")]
    for shrinkage in args.shrinkage:
        other = FusionHead([e.feature_dim for e in extractors], info.num_classes, 0)
        fit_lda_head(other, *total, shrinkage)
        rows[f"LDA, shrinkage {shrinkage:g}"] = accuracy(other)
    head = FusionHead([e.feature_dim for e in extractors], info.num_classes, 0)
    fit_lda_head(head, *total, cfg.fusion_shrinkage)
    rows[f"LDA from the nodes' summed statistics (shrinkage {cfg.fusion_shrinkage:g}; exact: the same as central)"] = accuracy(head)
    # what fusion-head=auto keeps: the LDA head if the nodes' validation splits score it above FedAvg's best round
    with torch.no_grad():
        lda_val = sum(int((head(features(n.val.x)).argmax(1) == n.val.y).sum()) for n in nodes) / max(1, sum(len(n.val) for n in nodes))
    selection = [json.loads(line) for line in (rd.path / "metrics.jsonl").read_text().splitlines() if '"fusion-selection"' in line]
    run_val = max(selection[-1]["val_accuracy"]) if selection else float("nan")
    print(f"federated validation accuracy: LDA head {100 * lda_val:.2f}%, the run's FedAvg head {100 * run_val:.2f}% "
          f"-> fusion-head=auto keeps the {'LDA' if lda_val > run_val else 'FedAvg'} head")
    everyone = torch.bincount(all_labels, minlength=info.num_classes)
    for adjust in (False, True):
        head, per_round = new_head(cfg.fusion_hidden), []
        for rnd in range(cfg.fusion_rounds):
            states = []
            for p, (f, y) in enumerate(zip(feats, labels)):
                local = new_head(cfg.fusion_hidden)
                local.load_state_dict(head.state_dict())
                shift = label_shift(torch.bincount(y, minlength=info.num_classes), everyone) if adjust else None
                fit_head(local, f, y, epochs=cfg.fusion_epochs, lr=cfg.fusion_lr, batch_size=cfg.batch_size,
                         seed=cfg.seed + 1000 * rnd + p, logit_shift=shift)
                states.append(local.state_dict())
            weights = [len(y) for y in labels]
            head.load_state_dict({k: sum(w * s[k].double() for s, w in zip(states, weights)).float() / sum(weights)
                                  for k in states[0]})
            per_round.append(accuracy(head))
        rows[f"FedAvg, logit shift {'on' if adjust else 'off'}, best round by test accuracy (an upper bound)"] = max(
            per_round, key=lambda p: int((p == test.y).sum()))
    names = info.class_names or [str(c) for c in range(info.num_classes)]
    if args.per_class:
        print("per-class test accuracy %: " + ", ".join(f"{c}={n}" for c, n in enumerate(names)))
    # where each row's errors go: between classes of one group (its specialist sees both) or between groups
    group_of = torch.tensor([owner[c] for c in range(info.num_classes)])
    print("accuracy  errors (in one group / between groups)  row")
    for name, pred in rows.items():
        correct = pred == test.y
        wrong = ~correct
        within = int((wrong & (group_of[pred] == group_of[test.y])).sum())
        line = (f"{100 * float(correct.float().mean()):6.2f}%  {int(wrong.sum()):5d} ({within:5d} / {int(wrong.sum()) - within:5d})"
                f"  {name}")
        if args.per_class:
            per_class = [100 * float(correct[test.y == c].float().mean()) if int((test.y == c).sum()) else float("nan")
                         for c in range(info.num_classes)]
            line += "\n         " + " ".join(f"{a:5.1f}" for a in per_class)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
