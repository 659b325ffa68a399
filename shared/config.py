"""The one run configuration: a typed dataclass filled from a TOML/YAML file,
``--set key=value`` and Flower's run config (``[tool.flwr.app.config]``).

Keys are kebab-case everywhere users see them (``base-epochs``), as in Flower's
run config; unknown keys and wrong types are rejected by name.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .compression_options import LEVELS, check_compression
from .errors import PapmError
from .files import read_table_file

# Config keys that do not change what a run computes (a resumed run may change them).
RUNTIME_ONLY = ("run-dir", "device", "timeout", "stop-after", "progress", "node-timeout", "sign-key")


@dataclass
class RunConfig:
    # data ("" / 0: the base checkpoint's, else the dataset's own: digits 1x8x8, cifar10 and imagefolder 3x32x32)
    dataset: str = ""
    data_root: str = ""
    image_size: int = 0  # images are resized (short side) and centre-cropped to this square size
    channels: int = 0  # 1 (grey) or 3 (RGB)
    val_fraction: float = 0.1
    partitioner: str = "iid"  # iid | dirichlet | by-group
    dirichlet_alpha: float = 0.5
    by_group_share: float = 0.8
    min_partition_size: int = 16  # every node gets at least this many training samples, or the run is refused
    seed: int = 0
    # nodes and devices
    nodes: int = 3
    devices: int = 3  # K: the number of device groups
    # phase 0: base model (FedAvg unless base-checkpoint is given)
    base_checkpoint: str = ""
    width: float = 0.25
    base_rounds: int = 8
    base_epochs: int = 5  # local epochs per round
    base_lr: float = 0.05
    batch_size: int = 128
    bn: str = "recalibrate"  # BatchNorm under FedAvg: recalibrate (exact statistics after each round), average, local (FedBN)
    bn_samples: int = 2048  # training images per node for BatchNorm statistics
    # phase 1: grouping
    similarity: str = "correlation"
    outputs: str = "softmax"
    balanced: bool = True
    grouping: str = "similarity"  # similarity (the method) | random: a seeded balanced random split (a baseline)
    # baselines a reviewer asks for instead of the K-device split: one model, all classes, pruned to one
    # device's budget (the latency of one part) or to the K parts' total parameter count
    baseline: str = "none"  # none | one-model-device-budget | one-model-total-budget
    # phase 3: prune + fine-tune
    budget: float = 0.77
    criterion: str = "papm"
    alpha: float = 0.5
    round_to: int = 1
    apoz_samples: int = 2048
    finetune_nodes: str = "all"  # all: every node fine-tunes every group's model (FedAvg over all data); group: its group's nodes
    finetune_rounds: int = 5
    finetune_epochs: int = 10  # passes over all nodes' data together, in sequential steps, split over the rounds
    finetune_lr: float = 0.02
    finetune_logit_adjust: bool = True  # each node fine-tunes on logits shifted by its class mix (label skew)
    finetune_scaffold: bool = True  # SCAFFOLD control variates: each node's steps corrected by (global - its own) mean gradient
    emphasis: float = 4.0
    emphasis_mode: str = "loss"
    kd: bool = False
    kd_weight: float = 0.5  # share of the distillation term in the fine-tuning loss (the rest: cross-entropy)
    kd_temperature: float = 4.0
    bn_recalibrate: bool = True  # re-estimate each fine-tuned model's BatchNorm statistics from all its nodes' data
    # compression options beside the one-shot PAPM cut (see compression_options.py)
    schedule: str = "oneshot"  # oneshot | iterative: `steps` cuts, APoZ re-measured on the nodes in between
    steps: int = 3  # cuts of the iterative schedule (a one-shot run ignores it)
    step_epochs: int = 1  # between two cuts: one FedAvg round of this many passes over all nodes' data (0: BatchNorm only)
    data_free: bool = False  # cut by weights only (criterion l1 or random) and fold removed channels into the next layers;
    # the groups' models then take no fine-tuning and no BatchNorm re-estimation
    sparsity: str = "none"  # none (channel pruning) | unstructured (zero `budget` of the conv weights) | 2:4 (budget unused)
    weight_bits: int = 0  # after fine-tuning, round weights to this many bits per output channel (0: fp32)
    weight_quant: str = "rtn"  # rtn (round to nearest, on the server) | gptq (layer by layer on the nodes' input sums)
    level: int = 0  # 1..5: a rung of the compression ladder (sets sparsity and weight-bits; budget unused), 0: none
    # phase 4: export (on the nodes: each group's extractor to ONNX, INT8 calibrated on local images)
    int8: bool = False
    int8_activations: str = "u8"  # u8 (unsigned activations: fastest with ONNX Runtime on x86) or s8
    calib_samples: int = 256  # local training images per INT8 calibration
    sign_key: str = ""  # Ed25519 private key (PEM, on the server) that signs the run's bundle manifest
    # phase 5: fusion head
    fusion_head: str = "auto"  # fedavg: an MLP trained by FedAvg rounds | lda: linear, in closed form from summed
    # statistics (exact under label skew) | auto: both, the one the nodes' validation splits score higher
    fusion_shrinkage: float = 0.01  # lda: the within-class covariance shrunk this far towards its mean variance
    fusion_rounds: int = 5
    fusion_epochs: int = 5  # local epochs per round
    fusion_lr: float = 0.003
    fusion_hidden: int = 128
    fusion_logit_adjust: bool = True  # each node trains the head on logits shifted by its class mix (label skew)
    # runtime
    run_dir: str = "runs/demo"
    device: str = "auto"
    timeout: float = 3600.0  # seconds to wait for one node's reply (long local training on a slow device takes a while)
    stop_after: str = ""  # stop after this phase (resume later with --resume)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "RunConfig | None" = None, source: str = "config") -> "RunConfig":
        """Apply ``values`` (kebab- or snake-case keys) over ``base`` (defaults if None), checking names and types."""
        cfg = RunConfig(**asdict(base)) if base is not None else cls()
        types = {f.name: f.type for f in fields(cls)}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in types:
                raise PapmError(f"unknown {source} key {key!r}; valid keys: {', '.join(cls.keys())}")
            setattr(cfg, name, _coerce(key, value, types[name], source))
        return cfg.validate()

    @classmethod
    def from_file(cls, path: str | Path, base: "RunConfig | None" = None) -> "RunConfig":
        path = Path(path)
        data = read_table_file(path, "config file", "a table of key = value pairs")
        # allow the pyproject-style nesting [tool.flwr.app.config] or a [papm] table
        for nest in (("tool", "flwr", "app", "config"), ("papm",)):
            d = data
            for k in nest:
                d = d.get(k, {}) if isinstance(d, dict) else {}
            if d:
                stray = [str(k) for k in data if str(k).replace("-", "_") in {f.name for f in fields(cls)}]
                if stray:  # written above the table's header: it would be silently ignored
                    raise PapmError(f"config file {path.name} sets {', '.join(stray)} outside its [{'.'.join(nest)}] "
                                    "table, where nothing is read; move it into the table")
                data = d
                break
        return cls.from_mapping(data, base, source=f"config file {path.name}")

    @classmethod
    def from_overrides(cls, items: list[str], base: "RunConfig | None" = None) -> "RunConfig":
        """``["devices=5", "kd=true"]`` -> config (values parsed by the field's type)."""
        values = {}
        for item in items:
            if "=" not in item:
                raise PapmError(f"--set expects key=value, got {item!r}; write --set {item.strip() or 'KEY'}=VALUE")
            k, v = item.split("=", 1)
            values[k.strip()] = v.strip()
        return cls.from_mapping(values, base, source="--set")

    # ---- checks and forms -----------------------------------------------------------
    def validate(self) -> "RunConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:  # the problem names the key and its allowed values; the fix says where keys are set
                raise PapmError(msg if "; " in msg else f"{msg}; set a valid value (--set KEY=VALUE or the config file; "
                                "`papm simulate --show-config` lists every key)")

        need(self.dataset in ("", "digits", "cifar10", "imagefolder"),
             f"dataset must be digits, cifar10 or imagefolder (or empty: the base checkpoint's), got {self.dataset!r}")
        need(self.image_size == 0 or 8 <= self.image_size <= 512, f"image-size must be in [8, 512] (or 0: automatic), got {self.image_size}")
        need(self.channels in (0, 1, 3), f"channels must be 1 (grey) or 3 (RGB) (or 0: automatic), got {self.channels}")
        need(self.min_partition_size >= 1, f"min-partition-size must be >= 1, got {self.min_partition_size}")
        need(self.bn in ("recalibrate", "average", "local"), f"bn must be recalibrate, average or local, got {self.bn!r}")
        need(self.bn_samples >= 2, f"bn-samples must be >= 2, got {self.bn_samples}")
        need(self.grouping in ("similarity", "random"), f"grouping must be similarity or random, got {self.grouping!r}")
        need(self.baseline in BASELINES, f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        mode_budget = self._mode_budget()
        need(self.baseline != "one-model-total-budget" or mode_budget is not None,
             "the one-model-total-budget baseline scales a budget, and this sparsity or level sets none of its own "
             "(2:4, levels 1 and 2); use baseline=one-model-device-budget or another compression")
        need(self.baseline != "one-model-total-budget" or mode_budget is None or self.devices * (1 - mode_budget) < 1,
             f"devices={self.devices} parts keeping {1 - (mode_budget or 0):.0%} each are as large as the base together; "
             "the one-model-total-budget baseline would be the unsplit base itself (lower devices or raise budget)")
        need(self.budget == RunConfig.budget or (self.sparsity != "2:4" and not self.level),
             f"budget {self.budget:g} is not used with " + ("level " + str(self.level) if self.level else "sparsity 2:4")
             + " (it sets its own); drop budget")
        need(self.int8_activations in ("u8", "s8"), f"int8-activations must be u8 or s8, got {self.int8_activations!r}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(bool(self.run_dir.strip()), "run-dir is empty; give a folder for the run, e.g. runs/demo")
        need(self.finetune_nodes in ("all", "group"), f"finetune-nodes must be all or group, got {self.finetune_nodes!r}")
        need(self.partitioner in ("iid", "dirichlet", "by-group"), f"partitioner must be iid, dirichlet or by-group, got {self.partitioner!r}")
        need(self.nodes >= 1, f"nodes must be >= 1, got {self.nodes}")
        need(self.devices >= 2, f"devices (K) must be >= 2, got {self.devices}")
        need(self.nodes >= self.devices, f"nodes ({self.nodes}) must be >= devices ({self.devices}): every device group needs a node")
        need(0.0 < self.budget < 1.0, f"budget must be in (0, 1) (the fraction of parameters to remove), got {self.budget}")
        need(self.criterion in ("papm", "l1", "apoz", "random"), f"criterion must be papm, l1, apoz or random, got {self.criterion!r}")
        need(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        need(self.similarity in ("correlation", "cosine", "covariance", "confusion"),
             f"similarity must be correlation, cosine, covariance or confusion, got {self.similarity!r}")
        need(self.outputs in ("softmax", "logits"), f"outputs must be softmax or logits, got {self.outputs!r}")
        need(self.emphasis_mode in ("loss", "sampling"), f"emphasis-mode must be loss or sampling, got {self.emphasis_mode!r}")
        need(0 < self.width <= 16, f"width must be in (0, 16] (1.0: the standard ResNet-18), got {self.width}")
        for name in ("base_rounds", "finetune_rounds", "fusion_rounds", "fusion_epochs", "calib_samples", "apoz_samples"):
            need(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        need(self.fusion_head in ("fedavg", "lda", "auto"), f"fusion-head must be fedavg, lda or auto, got {self.fusion_head!r}")
        need(0.0 <= self.fusion_shrinkage <= 1.0, f"fusion-shrinkage must be in [0, 1], got {self.fusion_shrinkage}")
        need(self.fusion_hidden >= 0, f"fusion-hidden must be >= 0 (0 = a linear head), got {self.fusion_hidden}")
        need(self.base_epochs >= 0, f"base-epochs must be >= 0, got {self.base_epochs}")
        for name in ("base_lr", "finetune_lr", "fusion_lr", "dirichlet_alpha"):
            need(getattr(self, name) > 0, f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        need(0.0 <= self.by_group_share <= 1.0, f"by-group-share must be in [0, 1], got {self.by_group_share}")
        need(0.0 <= self.kd_weight <= 1.0, f"kd-weight must be in [0, 1], got {self.kd_weight}")
        need(self.kd_temperature > 0, f"kd-temperature must be > 0, got {self.kd_temperature}")
        need(self.emphasis >= 1.0, f"emphasis must be >= 1 (1 = no emphasis on the group's classes), got {self.emphasis}")
        need(self.dataset != "imagefolder" or bool(self.data_root),
             "dataset imagefolder needs data-root (a folder with train/<class>/ images; the coordinator's also test/<class>/)")
        need(self.finetune_epochs >= 0, f"finetune-epochs must be >= 0, got {self.finetune_epochs}")
        need(self.round_to >= 1, f"round-to must be >= 1, got {self.round_to}")
        need(self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}")
        need(self.timeout > 0, f"timeout must be > 0 seconds, got {self.timeout}")
        need(0.0 <= self.val_fraction < 0.5, f"val-fraction must be in [0, 0.5), got {self.val_fraction}")
        need(self.val_fraction > 0 or self.fusion_head != "auto",
             "fusion-head=auto keeps the head the nodes' validation images like best, and val-fraction=0 leaves them none; "
             "set val-fraction > 0 or fusion-head=fedavg (its last round) or lda")
        need(not self.level or (self.sparsity == "none" and self.weight_bits == 0 and self.weight_quant == "rtn"),
             f"level {self.level} sets sparsity and weight-bits itself (rounding to nearest); drop them (or drop level)")
        c = self.compression()
        need(c["sparsity"] == "none" and c["budget"] is not None
             or (self.criterion, self.alpha, self.round_to) == (RunConfig.criterion, RunConfig.alpha, RunConfig.round_to),
             "criterion, alpha and round-to choose channels to cut; with sparsity or a level no channel is cut: "
             "drop one or the other")
        check_compression(budget=c["budget"], criterion=self.criterion, schedule=self.schedule, steps=self.steps,
                          step_epochs=self.step_epochs, data_free=self.data_free, sparsity=c["sparsity"],
                          weight_bits=c["weight_bits"], weight_quant=self.weight_quant, level=self.level, finetunes=False,
                          bn_recalibrate=False, kd=self.kd and self.data_free)
        need(self.stop_after in ("",) + PHASES, f"stop-after must be one of {', '.join(PHASES)}, got {self.stop_after!r}")
        return self

    def _mode_budget(self) -> float | None:
        """``budget``, or the level's own; None where the mode sets no budget (2:4, levels without unstructured)."""
        if self.level in LEVELS:
            return LEVELS[self.level].budget
        return None if self.sparsity == "2:4" else self.budget

    def compression(self) -> dict[str, Any]:
        """The sparsity, budget and weight bits this run prunes each model with: a level resolved to its rung, and
        for the one-model baseline at the K parts' total size the budget 1 - K x (1 - budget) (K parts keeping
        23% each = one model keeping K x 23%); budget None where the mode sets its own (2:4, levels 1-2)."""
        budget = self._mode_budget()
        if budget is not None and self.baseline == "one-model-total-budget":
            budget = 1.0 - self.devices * (1.0 - budget)
        if self.level in LEVELS:
            rung = LEVELS[self.level]
            return {"sparsity": rung.sparsity, "budget": budget, "weight_bits": rung.weight_bits, "weight_quant": rung.weight_quant}
        return {"sparsity": self.sparsity, "budget": budget, "weight_bits": self.weight_bits, "weight_quant": self.weight_quant}

    def to_flower(self) -> dict[str, Any]:
        """Flat kebab-case dict of scalars (a Flower run config / ConfigRecord)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        """Hash of what the run computes (runtime-only keys excluded)."""
        d = {k: v for k, v in self.to_flower().items() if k not in RUNTIME_ONLY}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "RunConfig") -> list[str]:
        a, b = self.to_flower(), other.to_flower()
        return [k for k in a if k not in RUNTIME_ONLY and a[k] != b[k]]


BASELINES = ("none", "one-model-device-budget", "one-model-total-budget")
PHASES = ("base", "statistics", "assignment", "prune", "export", "fusion", "evaluation", "bundle")


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PapmError(f"{source} key {key!r} must be true or false (or yes/no, 1/0), got {value!r}; e.g. {key}=true")
    if typ == "int":
        if isinstance(value, bool):
            raise PapmError(f"{source} key {key!r} must be an integer, got {value!r}; e.g. {key}=3")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise PapmError(f"{source} key {key!r} must be an integer, got {value!r}; e.g. {key}=3")
    if typ == "float":
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise PapmError(f"{source} key {key!r} must be a number, got {value!r}; e.g. {key}=0.5")
        if not math.isfinite(number):  # nan and inf pass every comparison check below them, so refuse them here
            raise PapmError(f"{source} key {key!r} must be a finite number, got {value!r}; give a finite value (no nan or inf)")
        return number
    if typ == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise PapmError(f"{source} key {key!r} must be a string, got {value!r}; quote it in a config file")
    raise PapmError(f"{source} key {key!r} has unsupported type {typ}")
