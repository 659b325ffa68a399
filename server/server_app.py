"""Flower ServerApp: drives one PAPM run, phase by phase, with the Message API.

Phases (DESIGN.md): base -> statistics -> assignment -> prune -> export -> fusion
-> evaluation. The server never reads a node's data: everything it knows about the
nodes' data arrives as sums in replies. Each phase writes its outputs into the run
directory before it is marked complete, so a run resumes after the last completed
phase. The server only holds the held-out test split, for server-side evaluation.
"""

from __future__ import annotations

import copy
import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from papm.deploy.group_report import write_group_report
from papm.deploy.grouping import analyse_stats, check_k
from papm.shared.checkpoint import load_checkpoint, load_head, save_checkpoint, save_head
from papm.shared.class_stats import ClassStatistics
from papm.shared.config import PHASES, RunConfig
from papm.shared.datasets import DatasetInfo
from papm.shared.errors import PapmError
from papm.shared.files import atomic_write, atomic_write_json
from papm.shared.fusion import FusionHead, SplitModel, head_args
from papm.shared.importance import ActivationCounts
from papm.shared.models import ResNet18, build_model, count_params, model_args
from papm.shared.node_data import server_test_split
from papm.shared.pruning import macs_and_params
from papm.shared.records import json_config, message_content, record_state, state_record
from papm.shared.specialise import PruneSettings, prune_model
from papm.shared.training import evaluate, predict_logits, resolve_device

from .assignment import assign_nodes
from .fedavg import weighted_average
from .messaging import exchange
from .run_directory import RunDirectory
from .summary import write_summary


class PapmRun:
    def __init__(self, grid: Grid, cfg: RunConfig, resume: bool):
        self.grid, self.cfg, self.resume = grid, cfg, resume
        self.rd = RunDirectory(cfg.run_dir)
        self.device = resolve_device(cfg.device)
        self.nodes: dict[int, dict] = {}  # node id -> {"partition_id", "class_counts", ...}
        self.failures: list[dict] = []
        self.info: DatasetInfo | None = None
        self.base: ResNet18 | None = None
        self.base_args: dict | None = None

    # ---- plumbing --------------------------------------------------------------------
    def send(self, phase: str, message_type: str, requests: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """Exchange with the given nodes; failed nodes leave the run and are reported by partition id."""
        result = exchange(self.grid, requests, message_type, self.cfg.timeout, group_id=phase)
        for node, why in result.failed.items():
            # before a node's first reply its partition-id is unknown: the node id stands in for it
            pid = self.nodes.get(node, {}).get("partition_id", f"unknown (node id {node})")
            self.failures.append({"phase": phase, "partition_id": pid, "node_id": node, "reason": why})
            log(WARNING, "node with partition-id %s failed in phase %s: %s", pid, phase, why)
            self.nodes.pop(node, None)
        if self.failures:
            self.rd.note("failures", self.failures)
        return {n: r.content for n, r in result.replies.items()}

    def content(self, papm: dict, **records) -> RecordDict:
        rd = message_content(self.cfg, papm=json_config(**papm))
        for k, v in records.items():
            rd[k] = v
        return rd

    def model_payload(self, model, args, key: str = "model") -> tuple[dict, dict]:
        return {f"{key}-args": args}, {key: state_record(model.state_dict())}

    def test_split(self):
        splits = server_test_split(self.cfg)
        return splits.test

    # ---- start -----------------------------------------------------------------------
    def wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.timeout
        said = 0.0
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= self.cfg.nodes or time.monotonic() > deadline:
                break
            if time.monotonic() - said > 15:
                said = time.monotonic()
                log(INFO, "waiting for nodes: %d of %d connected (up to %g s, the timeout key)", len(ids), self.cfg.nodes, self.cfg.timeout)
            time.sleep(1.0)
        if len(ids) < self.cfg.devices:
            raise PapmError(f"only {len(ids)} node(s) connected within {self.cfg.timeout:g} s but devices={self.cfg.devices} "
                            "groups each need one; start more SuperNodes (in a local `flwr run` simulation: "
                            f"--federation-config \"num-supernodes={self.cfg.nodes}\") and run again")
        if len(ids) < self.cfg.nodes:
            log(WARNING, "%d of %d nodes connected; continuing with those", len(ids), self.cfg.nodes)
        return ids

    def hello(self) -> None:
        ids = self.wait_for_nodes()
        replies = self.send("hello", "query.hello", {n: self.content({}) for n in ids})
        names = None
        total = sq = None
        count = 0
        for node, content in replies.items():
            m = content["metrics"]
            stats = {k: torch.from_numpy(np.array(v.numpy())) for k, v in content["stats"].items()}
            desc = {k: json.loads(v) for k, v in content["node"].items()}
            if names is None:
                names, shape = desc["class_names"], (desc["in_channels"], desc["image_size"])
                aug = (desc["hflip"], desc["crop_padding"], desc["dataset"])
            elif desc["class_names"] != names or (desc["in_channels"], desc["image_size"]) != shape:
                raise PapmError(f"node with partition-id {int(m['partition-id'])} has classes {desc['class_names']} "
                                f"and {desc['in_channels']}x{desc['image_size']} images, unlike the others; give every node the same classes")
            self.nodes[node] = {"partition_id": int(m["partition-id"]), "class_counts": stats["class-counts"].tolist(),
                                "num_examples": int(m["num-examples"])}
            total = stats["pixel-sum"] if total is None else total + stats["pixel-sum"]
            sq = stats["pixel-sqsum"] if sq is None else sq + stats["pixel-sqsum"]
            count += int(m["pixels-per-channel"])
        if not self.nodes:
            raise PapmError("no node answered; check that the SuperNodes are running and reach the SuperLink")
        pids = sorted(v["partition_id"] for v in self.nodes.values())
        if len(set(pids)) != len(pids):
            raise PapmError(f"two nodes report the same partition-id ({pids}); give every SuperNode its own partition-id")
        mean = total / count
        std = (sq / count - mean * mean).clamp_min(1e-6).sqrt()
        self.info = DatasetInfo(name=aug[2], class_names=names, in_channels=shape[0], image_size=shape[1],
                                mean=[round(float(v), 6) for v in mean], std=[round(float(v), 6) for v in std],
                                hflip=aug[0], crop_padding=aug[1], split_seed=self.cfg.seed, val_fraction=self.cfg.val_fraction,
                                source=self.cfg.data_root)
        check_k(self.cfg.devices, len(names))  # more devices than classes: stop before any work
        log(INFO, "%d nodes: partition-ids %s; %d classes", len(self.nodes), pids, len(names))

    def node_by_pid(self) -> dict[int, int]:
        return {v["partition_id"]: n for n, v in self.nodes.items()}

    # ---- phases ----------------------------------------------------------------------
    def run(self) -> None:
        completed = self.rd.start(self.cfg, self.resume)
        if completed:
            log(INFO, "resuming %s: completed phases %s are kept", self.rd.path, completed)
        # failures of earlier attempts stay on record (the summary reports them all)
        self.failures = list(self.rd.state().get("failures", []))
        if self.cfg.sign_key and not Path(self.cfg.sign_key).expanduser().is_file():
            raise PapmError(f"sign-key {self.cfg.sign_key} not found on the server; give the path of an Ed25519 private key "
                            "(papm deploy init writes one to KIT/signing/) or leave sign-key empty")
        phase = "hello"
        try:
            self.hello()
            for phase in PHASES:
                if self.rd.is_done(phase):
                    getattr(self, f"load_{phase}")()
                else:
                    t0 = time.perf_counter()
                    log(INFO, "phase %s", phase)
                    getattr(self, f"phase_{phase}")()
                    self.rd.mark_done(phase, seconds=round(time.perf_counter() - t0, 2))
                if self.cfg.stop_after == phase:
                    log(INFO, "stopping after phase %s as asked (stop-after); continue with --resume", phase)
                    return
        except PapmError as e:
            stops = self.rd.state().get("stops", [])
            self.rd.note("stops", stops + [{"phase": phase, "reason": str(e), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
            raise

    # phase 0
    def phase_base(self) -> None:
        cfg = self.cfg
        if cfg.base_checkpoint:
            model, info, ckpt = load_checkpoint(cfg.base_checkpoint)
            if info.class_names != self.info.class_names or (info.in_channels, info.image_size) != (self.info.in_channels, self.info.image_size):
                raise PapmError(f"base checkpoint {cfg.base_checkpoint} has classes {info.class_names} "
                                f"({info.in_channels}x{info.image_size}) but the nodes have {self.info.class_names}; use a matching checkpoint")
            self.info = info
            self.base, self.base_args = model, ckpt["model_args"]
        else:
            torch.manual_seed(cfg.seed)
            self.base_args = model_args(self.info.num_classes, self.info.in_channels, cfg.width)
            self.base = build_model(self.base_args)
            test = self.test_split()
            for rnd in range(cfg.base_rounds):
                papm, arrays = self.model_payload(self.base, self.base_args)
                replies = self.send("base", "train.base", {
                    n: self.content({**papm, "data-info": self.info.to_dict(), "round": rnd}, **arrays) for n in self.nodes})
                states = [record_state(c["model"]) for c in replies.values()]
                weights = [float(c["metrics"]["num-examples"]) for c in replies.values()]
                self.base.load_state_dict(weighted_average(states, weights))
                acc = evaluate(self.base, test, self.info, self.device)["accuracy"]
                loss = sum(float(c["metrics"]["train-loss"]) * w for c, w in zip(replies.values(), weights)) / sum(weights)
                self.rd.log_metrics("base", round=rnd + 1, nodes=len(replies), train_loss=loss, test_accuracy=acc)
                log(INFO, "base round %d/%d: %d nodes, loss %.4f, test accuracy %.4f", rnd + 1, cfg.base_rounds, len(replies), loss, acc)
        save_checkpoint(self.rd.path / "base.pt", self.base, self.base_args, self.info, kind="base",
                        meta={"source": cfg.base_checkpoint or "fedavg", "rounds": cfg.base_rounds})

    def load_base(self) -> None:
        self.base, self.info, ckpt = load_checkpoint(self.rd.path / "base.pt")
        self.base_args = ckpt["model_args"]

    # phase 1
    def phase_statistics(self) -> None:
        papm, arrays = self.model_payload(self.base, self.base_args)
        replies = self.send("statistics", "query.class_stats",
                            {n: self.content({**papm, "data-info": self.info.to_dict()}, **arrays) for n in self.nodes})
        if not replies:
            raise PapmError("no node returned class statistics; check the nodes and run again with --resume")
        stats = ClassStatistics.zeros(self.info.num_classes)
        for c in replies.values():
            stats = stats + ClassStatistics.from_arrays({k: v.numpy() for k, v in c["stats"].items()})
        buf = {k: v.clone() for k, v in stats.to_arrays().items()}
        atomic_write(self.rd.path / "class_stats.pt", lambda p: torch.save(buf, p))
        check_k(self.cfg.devices, self.info.num_classes)
        self.analysis = analyse_stats(stats, self.info.class_names, self.cfg.similarity, self.cfg.outputs, self.cfg.balanced)
        self.analysis.extra.update({"split": "train", "nodes": len(replies)})
        write_group_report(self.rd.path / "groups", self.analysis)
        self.rd.log_metrics("statistics", nodes=len(replies), samples=int(stats.counts.sum()))

    def load_statistics(self) -> None:
        arrays = torch.load(self.rd.path / "class_stats.pt", weights_only=True)
        stats = ClassStatistics.from_arrays(arrays)
        self.analysis = analyse_stats(stats, self.info.class_names, self.cfg.similarity, self.cfg.outputs, self.cfg.balanced)
        self.analysis.extra.update({"split": "train"})

    # phase 2
    def phase_assignment(self) -> None:
        k = self.cfg.devices
        groups = self.analysis.partitions[k]
        by_pid = {v["partition_id"]: np.asarray(v["class_counts"]) for v in self.nodes.values()}
        mapping = assign_nodes(by_pid, groups)
        self.assignment = {"k": k, "groups": groups, "partition_group": {str(p): g for p, g in sorted(mapping.items())}}
        nodes = [{"node": pid, "partition_id": pid, "group": g, "class_counts": [int(x) for x in by_pid[pid]]}
                 for pid, g in sorted(mapping.items())]
        write_group_report(self.rd.path / "groups", self.analysis, {"chosen_k": k, "nodes": nodes})
        self.rd.log_metrics("assignment", k=k, nodes=len(mapping),
                            nodes_per_group=[sum(1 for gg in mapping.values() if gg == g) for g in range(k)])
        for g in range(k):
            members = [p for p, gg in mapping.items() if gg == g]
            log(INFO, "group %d (%s): partition-ids %s", g, " ".join(self.info.class_names[c] for c in groups[g]), members)

    def load_assignment(self) -> None:
        doc = json.loads((self.rd.path / "groups" / "assignment.json").read_text())
        groups = [doc["groups"][str(g)]["classes"] for g in range(doc["k"])]
        self.assignment = {"k": doc["k"], "groups": groups,
                           "partition_group": {p: v["group"] for p, v in doc["nodes"].items()}}

    def group_nodes(self) -> dict[int, list[int]]:
        """Group -> node ids of the live nodes serving it; a group with none stops the run."""
        by_pid = self.node_by_pid()
        out: dict[int, list[int]] = {g: [] for g in range(self.assignment["k"])}
        for pid, g in self.assignment["partition_group"].items():
            if int(pid) in by_pid:
                out[int(g)].append(by_pid[int(pid)])
        lost = [g for g, ns in out.items() if not ns]
        if lost:
            pids = {g: [p for p, gg in self.assignment["partition_group"].items() if int(gg) == g] for g in lost}
            raise PapmError(f"device group(s) {lost} lost every node (partition-ids {pids}); bring a node of each back "
                            "and continue with --resume")
        return out

    # phase 3
    def phase_prune(self) -> None:
        cfg = self.cfg
        groups = self.assignment["groups"]
        settings = PruneSettings(budget=cfg.budget, criterion=cfg.criterion, alpha=cfg.alpha, round_to=cfg.round_to,
                                 apoz_samples=cfg.apoz_samples).validate()
        counts: dict[int, ActivationCounts] = {g: ActivationCounts() for g in range(len(groups))}
        apoz_nodes = {g: 0 for g in range(len(groups))}  # nodes whose APoZ counts went into each group's plan
        if cfg.criterion in ("papm", "apoz"):
            members = self.group_nodes()
            papm, arrays = self.model_payload(self.base, self.base_args)
            requests = {n: self.content({**papm, "data-info": self.info.to_dict(), "classes": groups[g]}, **arrays)
                        for g, ns in members.items() for n in ns}
            replies = self.send("prune", "query.apoz", requests)
            for g, ns in members.items():
                for n in ns:
                    if n in replies:
                        apoz_nodes[g] += 1
                        counts[g] = counts[g] + ActivationCounts.from_arrays(
                            {k: torch.from_numpy(np.array(v.numpy())) for k, v in replies[n]["counts"].items()})
            self.group_nodes()  # a group whose every node failed just now stops the run here
        models, args = {}, {}
        for g in range(len(groups)):
            model = copy.deepcopy(self.base).cpu()
            result, args[g] = prune_model(model, self.base_args, self.info, settings, counts[g] if counts[g].zeros else None, seed=cfg.seed)
            models[g] = model
            self.rd.log_metrics("prune", device=g, params_before=result.params_before, params_after=result.params_after,
                                reduction=round(result.reduction, 6))
        teacher = self.model_payload(self.base, self.base_args, "teacher") if cfg.kd else ({}, {})
        for rnd in range(cfg.finetune_rounds):
            members = self.group_nodes()
            requests = {}
            for g, ns in members.items():
                papm, arrays = self.model_payload(models[g], args[g])
                for n in ns:
                    requests[n] = self.content({**papm, **teacher[0], "data-info": self.info.to_dict(), "classes": groups[g],
                                                "round": rnd}, **arrays, **teacher[1])
            replies = self.send("prune", "train.finetune", requests)
            for g, ns in members.items():
                got = [n for n in ns if n in replies]
                if not got:
                    raise PapmError(f"device group {g} lost every node while fine-tuning; bring one back and continue with --resume")
                models[g].load_state_dict(weighted_average([record_state(replies[n]["model"]) for n in got],
                                                           [float(replies[n]["metrics"]["num-examples"]) for n in got]))
            self.rd.log_metrics("finetune", round=rnd + 1, nodes=len(replies))
        test = self.test_split()
        example = torch.zeros(1, self.info.in_channels, self.info.image_size, self.info.image_size)
        macs_before, params_before = macs_and_params(self.base.cpu(), example)
        for g, model in models.items():
            d = self.rd.device_dir(g)
            path = save_checkpoint(d / "pruned.pt", model, args[g], self.info, kind="pruned",
                                   meta={"classes": groups[g], "device": g})
            macs_after, params_after = macs_and_params(model, example)
            report = {
                "device": g, "classes": groups[g], "class_names": [self.info.class_names[c] for c in groups[g]],
                "params_before": params_before, "params_after": params_after,
                "reduction": round(1 - params_after / params_before, 6), "target": cfg.budget, "criterion": cfg.criterion,
                "alpha": cfg.alpha, "kept_channels": args[g]["channels"], "macs_before": macs_before, "macs_after": macs_after,
                "bytes": path.stat().st_size,
                "test_accuracy": {"all": evaluate(model, test, self.info, self.device)["accuracy"],
                                  "group": evaluate(model, test, self.info, self.device, classes=groups[g])["accuracy"]},
                "apoz_nodes": apoz_nodes[g],
            }
            atomic_write_json(d / "prune.json", report)

    def load_prune(self) -> None:
        pass  # outputs are read where they are needed (devices/device-k/pruned.pt)

    def extractors(self) -> list:
        return [load_checkpoint(self.rd.device_dir(g) / "pruned.pt")[0] for g in range(self.assignment["k"])]

    # phase 4
    def phase_export(self) -> None:
        """On the devices: each group's extractor to ONNX (and INT8 with int8=true, calibrated on the
        exporting node's own training images), checked against PyTorch there on local images.

        One node per group exports (the first live one); the unsplit base model, kept in the bundle
        for comparison, goes to a spare node when there is one. Before the server keeps a file it
        checks it itself, on held-out test inputs (a check, nothing is fitted): fp32 against its own
        copy of the model, INT8 against that fp32 graph. An item that fails (on the node or in that
        check) goes to the next node of its group; a group whose nodes all failed stops the run.
        """
        from papm.export.onnx_export import feature_graph, int8_check, parity, parity_inputs
        from papm.shared.datasets import normalise
        from papm.shared.records import record_bytes

        extractors = self.extractors()
        x_check = parity_inputs(normalise(self.test_split().x, self.info), n=64, seed=self.cfg.seed)
        # INT8 is judged on real images only: its ranges were calibrated on images, noise saturates them
        x_real = x_check[:-8] if len(x_check) > 8 else x_check
        groups = self.assignment["groups"]
        # what must be exported: name -> (model, args, graph, classes, group or None, destination stem)
        todo: dict[str, tuple] = {f"device-{g}": (e, self._args_of(g), "features", groups[g], g,
                                                   self.rd.device_dir(g) / "extractor") for g, e in enumerate(extractors)}
        todo["base"] = (self.base, self.base_args, "logits", [], None, self.rd.path / "base")
        tried: dict[str, set[int]] = {name: set() for name in todo}
        done: dict[str, dict] = {}

        def item_failed(name: str, node: int, why: str) -> None:
            pid = self.nodes.get(node, {}).get("partition_id", f"unknown (node id {node})")
            self.failures.append({"phase": "export", "partition_id": pid, "node_id": node, "item": name,
                                  "reason": why, "left_run": False})
            log(WARNING, "export of %s on partition-id %s failed: %s; trying another node", name, pid, why)
            self.rd.note("failures", self.failures)

        def accept(name: str, files: dict[str, bytes], report: dict) -> None:
            """Check the node's files against the server's own models, then move them into place."""
            model, _, graph, _, g, stem = todo[name]
            if "error" in report:
                raise PapmError(report["error"])
            fp32, int8 = stem.with_suffix(".onnx"), stem.with_name(stem.name + ".int8.onnx")
            incoming = {p: stem.with_name(f".{stem.name}.incoming.{p}.onnx") for p in ("fp32", "int8") if f"{name}.{p}" in files}
            if "fp32" not in incoming or (self.cfg.int8 and "int8" not in incoming):
                raise PapmError(f"the reply lacks {name}'s {'INT8' if 'fp32' in incoming else 'fp32'} file")
            try:
                for p, path in incoming.items():
                    atomic_write(path, lambda t, b=files[f"{name}.{p}"]: Path(t).write_bytes(b))
                check = parity(feature_graph(model) if graph == "features" else model, incoming["fp32"], x_check)
                if not check["ok"]:
                    raise PapmError(f"its ONNX differs from the server's model by {check['max_abs_diff']:.3g}")
                entry = {"file": str(fp32.relative_to(self.rd.path)), "node_report": report,
                         "server_max_abs_diff": check["max_abs_diff"], "tolerance": check["tolerance"],
                         "feature_dim" if graph == "features" else "num_classes": int(check["output_shape"][0])}
                if "int8" in incoming:
                    q = int8_check(incoming["fp32"], incoming["int8"], x_real)
                    if not q["ok"]:
                        raise PapmError(f"its INT8 graph is off by {q['rel_error']:.3g} relative to fp32")
                    entry.update(int8_file=str(int8.relative_to(self.rd.path)), int8_rel_error=q["rel_error"])
                os.replace(incoming["fp32"], fp32)
                if "int8" in incoming:
                    os.replace(incoming["int8"], int8)
            finally:
                for path in incoming.values():
                    path.unlink(missing_ok=True)
            done[name] = entry
            self.rd.log_metrics("export", model=name, partition_id=report["partition_id"], max_abs_diff=report["max_abs_diff"],
                                server_max_abs_diff=check["max_abs_diff"], int8_rel_error=entry.get("int8_rel_error"))

        while todo:
            members = self.group_nodes()
            plan: dict[int, list[str]] = {}
            for name, (_, _, _, _, g, _) in todo.items():
                if g is None:
                    continue
                free = [n for n in sorted(members[g], key=lambda n: self.nodes[n]["partition_id"]) if n not in tried[name]]
                if not free:
                    raise PapmError(f"no node of device group {g} could export its extractor ({len(tried[name])} tried); "
                                    "see the failures in state.json, fix the nodes and continue with --resume")
                plan.setdefault(free[0], []).append(name)
            if "base" in todo:
                untried = [n for n in self.nodes if n not in tried["base"]]
                spare = [n for n in untried if n not in plan]
                pick = spare[0] if spare else (untried[0] if untried else None)
                if pick is None:
                    raise PapmError("no node could export the base model; fix the nodes and continue with --resume")
                plan.setdefault(pick, []).append("base")
            requests = {}
            for n, names in plan.items():
                papm, arrays = {"data-info": self.info.to_dict(), "items": []}, {}
                for name in names:
                    model, args, graph, classes, _, _ = todo[name]
                    key = name.replace("-", "_")
                    papm[f"{key}-args"] = args
                    # calibration classes per item: the group's for an extractor, all for the base model
                    papm["items"].append({"key": key, "graph": graph, "name": name, "classes": classes})
                    arrays[key] = state_record(model.state_dict())
                    tried[name].add(n)
                requests[n] = self.content(papm, **arrays)
            replies = self.send("export", "query.export", requests)
            for n, content in replies.items():
                try:
                    files = record_bytes(content["files"])
                    reports = {k: json.loads(v) for k, v in content["reports"].items()}
                except (KeyError, ValueError) as e:  # a malformed reply: that node's items go elsewhere
                    for name in plan[n]:
                        item_failed(name, n, f"malformed reply ({type(e).__name__}: {e}); server and client versions differ?")
                    continue
                for name in plan[n]:
                    try:
                        accept(name, files, reports.get(name, {"error": "no report for this item"}))
                        todo.pop(name)
                    except Exception as e:  # noqa: BLE001 - a bad file (or ONNX Runtime refusing it) fails the item only
                        item_failed(name, n, str(e) if isinstance(e, PapmError) else f"{type(e).__name__}: {e}")
        parts = [{"device": g, **done[f"device-{g}"]} for g in range(len(groups))]
        atomic_write_json(self.rd.path / "devices" / "extractors.json", {"parts": parts, "base": done["base"], "int8": self.cfg.int8})

    def load_export(self) -> None:
        pass

    # phase 5
    def phase_fusion(self) -> None:
        cfg = self.cfg
        extractors = self.extractors()
        papm, arrays = {"extractors": len(extractors), "data-info": self.info.to_dict()}, {}
        for k, e in enumerate(extractors):
            p, a = self.model_payload(e, {**json.loads(json.dumps(self._args_of(k)))}, f"extractor-{k}")
            papm.update(p)
            arrays.update(a)
        replies = self.send("fusion", "query.feature_stats", {n: self.content(papm, **arrays) for n in self.nodes})
        if not replies:
            raise PapmError("no node returned feature statistics; check the nodes and continue with --resume")
        hargs = head_args([e.feature_dim for e in extractors], self.info.num_classes, cfg.fusion_hidden)
        torch.manual_seed(cfg.seed)
        head = FusionHead(hargs["feature_dims"], hargs["num_classes"], hargs["hidden"])
        total = sum(torch.from_numpy(np.array(c["sums"]["sum"].numpy())) for c in replies.values())
        total_sq = sum(torch.from_numpy(np.array(c["sums"]["sqsum"].numpy())) for c in replies.values())
        count = sum(int(c["metrics"]["num-examples"]) for c in replies.values())
        head.set_normalisation(total, total_sq, count)
        split = SplitModel(extractors, head)
        test = self.test_split()
        for rnd in range(cfg.fusion_rounds):
            replies = self.send("fusion", "train.fusion", {
                n: self.content({**papm, "head-args": hargs, "round": rnd}, head=state_record(head.state_dict()), **arrays)
                for n in self.nodes})
            if not replies:
                raise PapmError("no node trained the fusion head; check the nodes and continue with --resume")
            head.load_state_dict(weighted_average([record_state(c["head"]) for c in replies.values()],
                                                  [float(c["metrics"]["num-examples"]) for c in replies.values()]))
            acc = evaluate(split, test, self.info, self.device)["accuracy"]
            self.rd.log_metrics("fusion", round=rnd + 1, nodes=len(replies), test_accuracy=acc)
            log(INFO, "fusion round %d/%d: %d nodes, test accuracy %.4f", rnd + 1, cfg.fusion_rounds, len(replies), acc)
        save_head(self.rd.path / "fusion" / "head.pt", head, hargs, self.info, meta={"devices": list(range(len(extractors)))})

    def _args_of(self, k: int) -> dict:
        from papm.shared.checkpoint import read_checkpoint

        return read_checkpoint(self.rd.device_dir(k) / "pruned.pt")["model_args"]

    def load_fusion(self) -> None:
        pass

    # phase 6
    def phase_evaluation(self) -> None:
        extractors = self.extractors()
        head, _, hckpt = load_head(self.rd.path / "fusion" / "head.pt")
        split = SplitModel(extractors, head)
        test = self.test_split()
        base_eval = evaluate(self.base, test, self.info, self.device)
        fusion_eval = evaluate(split, test, self.info, self.device)
        papm = {"extractors": len(extractors), "data-info": self.info.to_dict(), "head-args": hckpt["head_args"]}
        arrays = {"head": state_record(head.state_dict())}
        p, a = self.model_payload(self.base, self.base_args)
        papm.update(p)
        arrays.update(a)
        for k, e in enumerate(extractors):
            p, a = self.model_payload(e, self._args_of(k), f"extractor-{k}")
            papm.update(p)
            arrays.update(a)
        replies = self.send("evaluation", "evaluate", {n: self.content(papm, **arrays) for n in self.nodes})
        n = sum(int(c["metrics"]["num-examples"]) for c in replies.values())
        federated = {
            "nodes": len(replies), "samples": n,
            "base_accuracy": sum(int(c["metrics"]["base-correct"]) for c in replies.values()) / n if n else float("nan"),
            "fusion_accuracy": sum(int(c["metrics"]["fusion-correct"]) for c in replies.values()) / n if n else float("nan"),
        }
        devices = []
        for g in range(self.assignment["k"]):
            devices.append(json.loads((self.rd.device_dir(g) / "prune.json").read_text()))
        evaluation = {
            "test_samples": len(test),
            "base": {"accuracy": base_eval["accuracy"], "params": count_params(self.base),
                     "per_class": {self.info.class_names[c]: a for c, a in base_eval["per_class"].items()}},
            "fusion": {"accuracy": fusion_eval["accuracy"],
                       "params": sum(count_params(e) for e in extractors) + count_params(head),
                       "per_class": {self.info.class_names[c]: a for c, a in fusion_eval["per_class"].items()}},
            "federated": federated,
            "devices": devices,
            "failures": self.failures + [f for f in self.rd.state().get("failures", []) if f not in self.failures],
            "stops": self.rd.state().get("stops", []),
        }
        # The edge bundle: parts + fusion head + base model, checksummed (and INT8 when int8=true),
        # with the test accuracy measured through ONNX Runtime as the devices will run it.
        from papm.export.onnx_export import export_run

        bundle = export_run(self.rd.path, int8=self.cfg.int8, force=True, log=lambda line: log(INFO, "%s", line),
                            test_split=self.test_split(), from_run=True,
                            sign_key=str(Path(self.cfg.sign_key).expanduser()) if self.cfg.sign_key else None)
        evaluation["bundle"] = {"path": "bundle", "accuracy": bundle["accuracy"],
                                "max_abs_diff": max(r["max_abs_diff"] for r in bundle["parity"])}
        atomic_write_json(self.rd.path / "evaluation.json", evaluation)
        write_summary(self.rd.path, self.cfg, self.info, evaluation)
        self.rd.log_metrics("evaluation", base_accuracy=base_eval["accuracy"], fusion_accuracy=fusion_eval["accuracy"],
                            federated_base_accuracy=federated["base_accuracy"], federated_fusion_accuracy=federated["fusion_accuracy"])

    def load_evaluation(self) -> None:
        pass


def build_server_app(cfg: RunConfig | None = None, resume: bool = True) -> ServerApp:
    """A ServerApp for ``cfg``; without one it reads Flower's run config (``flwr run``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_mapping(dict(context.run_config), source="run config")
        PapmRun(grid, run_cfg, resume).run()

    return server_app


# `flwr run .` loads this; it resumes a run directory that holds the same config.
app = build_server_app()
