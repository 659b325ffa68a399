"""The run driver: node bookkeeping, one exchange with the nodes, and the phase loop.

Phases (``server/phases/``, DESIGN.md) run in order: base -> statistics -> assignment ->
prune -> export -> fusion -> evaluation -> bundle. Each reads its inputs from the run
directory and writes its outputs there before it is marked complete, so a run resumes
after the last completed phase. The server never reads a node's data: everything it knows
about it arrives as sums in replies; it only holds the held-out test split.
"""

from __future__ import annotations

import json
import math
import time
from logging import INFO, WARNING
from typing import Callable

import torch
from flwr.app import RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..client.records import json_config, message_content, record_state, state_record
from ..deploy.bundle import check_run_signing_key
from ..shared.bn import BNSums, set_bn_statistics
from ..shared.compression_options import check_budget_reachable
from ..shared.config import PHASES, RunConfig
from ..shared.datasets import DatasetInfo, ImageSet, mean_std_from_sums
from ..shared.errors import PapmError
from ..shared.grouping import check_k
from ..shared.models import model_args
from ..shared.node_data import server_test_split
from ..shared.training import resolve_device
from .messaging import exchange
from .run_directory import RunDirectory


class RunDriver:
    """What every phase works with: the grid, the config, the run directory and the live nodes."""

    def __init__(self, grid: Grid, cfg: RunConfig, resume: bool, parallel_nodes: int | None = None):
        self.grid, self.cfg, self.resume = grid, cfg, resume
        # how many nodes work at the same time: all of them on real devices; in a simulation the
        # engine's workers, so the others wait their turn and an exchange may take that much longer
        self.parallel_nodes = parallel_nodes
        self.rd = RunDirectory(cfg.run_dir)
        self.device = resolve_device(cfg.device)
        self.nodes: dict[int, dict] = {}  # node id -> {"partition_id", "class_counts", "num_examples"}
        self.failures: list[dict] = []
        self.node_info: DatasetInfo | None = None  # the nodes' data, with the run's normalisation (from hello)
        self._test: ImageSet | None = None
        self.exchanges = 0  # message exchanges of the current phase (state.json: what a phase's wall time paid for)

    # ---- exchanges ---------------------------------------------------------------------
    def send(self, phase: str, message_type: str, requests: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """Exchange with the given nodes; failed nodes leave the run and are reported by partition id."""
        self.exchanges += 1
        turns = math.ceil(len(requests) / self.parallel_nodes) if self.parallel_nodes else 1
        result = exchange(self.grid, requests, message_type, self.cfg.timeout * max(1, turns), group_id=phase)
        for node, why in result.failed.items():
            # before a node's first reply its partition-id is unknown: the node id stands in for it
            pid = self.nodes.get(node, {}).get("partition_id", f"unknown (node id {node})")
            self.failures.append({"phase": phase, "partition_id": pid, "node_id": node, "reason": why})
            log(WARNING, "node with partition-id %s failed in phase %s: %s", pid, phase, why)
            self.nodes.pop(node, None)
        if self.failures:
            self.rd.note("failures", self.failures)
        # Replies arrive in whatever order the nodes finish; averaging them in that order makes two runs of one
        # config differ in the last bits (and, over rounds, in a test image or two): order them by partition-id.
        return {n: result.replies[n].content for n in self.by_partition(result.replies)}

    def by_partition(self, node_ids) -> list[int]:
        """Node ids in partition-id order (node ids, which Flower draws at random, only for nodes not yet known)."""
        return sorted(node_ids, key=lambda n: (self.nodes.get(n, {}).get("partition_id", math.inf), n))

    def class_counts(self, node_ids) -> list[int]:
        """Training images per class of these nodes together (from hello): the class mix a logit shift is against."""
        return [int(c) for c in torch.tensor([self.nodes[n]["class_counts"] for n in node_ids]).sum(0)]

    def item_failed(self, phase: str, node: int, item: str, why: str) -> None:
        """One job of a node failed (the node stays in the run; another node takes the job)."""
        pid = self.nodes.get(node, {}).get("partition_id", f"unknown (node id {node})")
        self.failures.append({"phase": phase, "partition_id": pid, "node_id": node, "item": item,
                              "reason": why, "left_run": False})
        log(WARNING, "%s of %s on partition-id %s failed: %s; trying another node", phase, item, pid, why)
        self.rd.note("failures", self.failures)

    def content(self, papm: dict, **records) -> RecordDict:
        rd = message_content(self.cfg, papm=json_config(**papm))
        for k, v in records.items():
            rd[k] = v
        return rd

    @staticmethod
    def model_payload(model, args, key: str = "model") -> tuple[dict, dict]:
        return {f"{key}-args": args}, {key: state_record(model.state_dict())}

    def extractors_payload(self, loaded: list[tuple]) -> tuple[dict, dict]:
        """The message fields that carry every (model, args) extractor: ``extractor-k-args`` and ``extractor-k``."""
        papm, arrays = {"extractors": len(loaded)}, {}
        for k, (model, args) in enumerate(loaded):
            p, a = self.model_payload(model, args, f"extractor-{k}")
            papm.update(p)
            arrays.update(a)
        return papm, arrays

    def job_requests(self, holders: dict[str, list[int]], models: dict[str, tuple], papm: dict, arrays: dict,
                     jobs: dict[str, dict] | None = None) -> dict[int, RecordDict]:
        """One message per node carrying every model it works on (``holders``: model key -> node ids),
        each with its job fields (``jobs[key]``), on top of the shared ``papm``/``arrays`` fields."""
        per_node: dict[int, list[str]] = {}
        for key, ns in holders.items():
            for n in ns:
                per_node.setdefault(n, []).append(key)
        requests = {}
        for n, keys in per_node.items():
            fields, records = dict(papm), dict(arrays)
            fields["jobs"] = [{"key": key, **(jobs or {}).get(key, {})} for key in keys]
            for key in (k for k in keys if k in models):
                p, a = self.model_payload(*models[key], key=key)
                fields.update(p)
                records.update(a)
            requests[n] = self.content(fields, **records)
        return requests

    def recalibrate_bn(self, phase: str, models: dict[str, tuple], holders: dict[str, list[int]], info: DatasetInfo) -> None:
        """Exact BatchNorm statistics for each (model, args) in ``models`` from the sums of the nodes that hold
        it (``holders``): the statistics one machine holding all their data would compute."""
        replies = self.send(phase, "query.bn_stats", self.job_requests(holders, models, {"data-info": info.to_dict()}, {}))
        for key, (model, _) in models.items():
            got = [n for n in holders[key] if n in replies]
            if not got:
                raise PapmError(f"no node returned BatchNorm statistics in phase {phase}; check the nodes and continue with --resume")
            sums = [BNSums.from_arrays(record_state(replies[n][f"bn-{key}"])) for n in got]
            set_bn_statistics(model, sum(sums[1:], sums[0]))

    def test_split(self) -> ImageSet:
        if self._test is None:
            self._test = server_test_split(self.cfg).test
        return self._test

    # ---- nodes -------------------------------------------------------------------------
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
        """Who the nodes are, what data they hold (classes, image shape) and the run's normalisation (from sums)."""
        ids = self.wait_for_nodes()
        replies = self.send("hello", "query.hello", {n: self.content({}) for n in ids})
        # every node's classes and image shape must be those of the coordinator's test split
        ref = server_test_split(self.cfg).info
        names, shape = ref.class_names, (ref.in_channels, ref.image_size)
        total = sq = None
        count = 0
        for node, content in replies.items():
            m = content["metrics"]
            stats = record_state(content["stats"])
            desc = {k: json.loads(v) for k, v in content["node"].items()}
            aug = (desc["hflip"], desc["crop_padding"], desc["dataset"])
            if desc["class_names"] != names:
                raise PapmError(f"node with partition-id {int(m['partition-id'])} has classes {desc['class_names']} but the "
                                f"coordinator's test split has {names}; give every device the same class folders")
            if (desc["in_channels"], desc["image_size"]) != shape:
                raise PapmError(f"node with partition-id {int(m['partition-id'])} reads {desc['in_channels']}x{desc['image_size']}"
                                f"x{desc['image_size']} images but the coordinator {shape[0]}x{shape[1]}x{shape[1]}; "
                                "run every node and the coordinator with the same papm version and run config")
            self.nodes[node] = {"partition_id": int(m["partition-id"]), "class_counts": stats["class-counts"].tolist(),
                                "num_examples": int(m["num-examples"])}
            total = stats["pixel-sum"] if total is None else total + stats["pixel-sum"]
            sq = stats["pixel-sqsum"] if sq is None else sq + stats["pixel-sqsum"]
            count += int(m["pixels-per-channel"])
        if not self.nodes:
            reasons = [f["reason"] for f in self.failures if f["phase"] == "hello"]
            if reasons:  # every node refused its data or config: say why, not only that
                raise PapmError(f"every node failed at the start of the run ({reasons[-1]}); fix the nodes' data or the "
                                "run config and start again")
            raise PapmError("no node answered; check that the SuperNodes are running and reach the SuperLink")
        pids = sorted(v["partition_id"] for v in self.nodes.values())
        if len(set(pids)) != len(pids):
            raise PapmError(f"two nodes report the same partition-id ({pids}); give every SuperNode its own partition-id")
        mean, std = mean_std_from_sums(total, sq, count)
        kept = self.rd.state().get("normalisation")
        if kept and kept.get("class_names") == names:  # a resumed run keeps the normalisation it started with
            mean, std = kept["mean"], kept["std"]
        else:
            self.rd.note("normalisation", {"class_names": names, "mean": mean, "std": std})
        self.node_info = DatasetInfo(name=aug[2], class_names=names, in_channels=shape[0], image_size=shape[1], mean=mean, std=std,
                                     hflip=aug[0], crop_padding=aug[1], split_seed=self.cfg.seed,
                                     val_fraction=self.cfg.val_fraction, source=self.cfg.data_root)
        if len(self.test_split()) and (unmeasured := self.test_split().classes_without_images(ref)):
            log(WARNING, "the coordinator's test split holds no images of %s: their test accuracy is not measured",
                ", ".join(unmeasured))
        check_k(self.cfg.devices, len(names))  # more devices than classes: stop before any work
        cut = self.cfg.compression()
        if cut["sparsity"] == "none" and cut["budget"] is not None:  # a channel cut: its budget must be reachable
            check_budget_reachable(cut["budget"], self.cfg.round_to, model_args(len(names), shape[0], self.cfg.width),
                                   shape[1])
        log(INFO, "%d nodes: partition-ids %s; %d classes", len(self.nodes), pids, len(names))

    def node_by_pid(self) -> dict[int, int]:
        return {v["partition_id"]: n for n, v in self.nodes.items()}

    def group_nodes(self, assignment: dict) -> dict[int, list[int]]:
        """Group -> node ids of the live nodes serving it; a group with none stops the run."""
        by_pid = self.node_by_pid()
        out: dict[int, list[int]] = {g: [] for g in range(assignment["k"])}
        for pid, g in assignment["partition_group"].items():
            if pid in by_pid:
                out[g].append(by_pid[pid])
        out = {g: self.by_partition(ns) for g, ns in out.items()}  # sums in one order, whatever order groups were written in
        lost = [g for g, ns in out.items() if not ns]
        if lost:
            pids = {g: [p for p, gg in assignment["partition_group"].items() if gg == g] for g in lost}
            raise PapmError(f"device group(s) {lost} lost every node (partition-ids {pids}); bring a node of each back "
                            "and continue with --resume")
        return out

    # ---- the phase loop ----------------------------------------------------------------
    def run(self, runners: dict[str, Callable[["RunDriver"], None]]) -> None:
        """Every phase not yet complete, in order: ``runners[phase](self)``, then mark it complete."""
        check_run_signing_key(self.cfg.sign_key)  # unreadable, encrypted or not Ed25519: now, not after the whole run
        completed = self.rd.start(self.cfg, self.resume)
        if completed:
            log(INFO, "resuming %s: completed phases %s are kept", self.rd.path, completed)
        if self.rd.new_keys:  # the phases still to run use them; the completed ones ran without
            log(WARNING, "%s was started by a version without config key(s) %s: the phases still to run use %s",
                self.rd.path, ", ".join(self.rd.new_keys), ", ".join(f"{k}={v!r}" for k, v in self.rd.new_keys.items()))
        # failures of earlier attempts stay on record (the summary reports them all)
        self.failures = list(self.rd.state().get("failures", []))
        phase = "hello"
        try:
            self.hello()
            for phase in PHASES:
                if not self.rd.is_done(phase):
                    t0, self.exchanges = self.rd.start_clock(phase), 0  # a resumed phase counts its earlier time
                    log(INFO, "phase %s", phase)
                    runners[phase](self)
                    self.rd.mark_done(phase, seconds=round(time.perf_counter() - t0, 2), exchanges=self.exchanges)
                if self.cfg.stop_after == phase:
                    log(INFO, "stopping after phase %s as asked (stop-after); continue with --resume", phase)
                    return
        except PapmError as e:
            stops = self.rd.state().get("stops", [])
            self.rd.note("stops", stops + [{"phase": phase, "reason": str(e), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
            raise
