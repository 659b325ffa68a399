"""The compression options and the rules for combining them, in one place for `papm prune` (flags)
and the federated run (config keys). Pure Python: a run config is validated before torch loads.

The ladder of compression levels (a fixed combination of sparsity and weight bits; every rung
rounds weights to nearest per output channel, so a level means the same in `papm prune` and in
a federated run, where no one machine holds calibration images for GPTQ):

=====  ================================  ======
level  sparsity (of conv weights)        weights
=====  ================================  ======
1      none                              8-bit
2      2:4 (50%)                         8-bit
3      unstructured 75%                  8-bit
4      unstructured 75%                  4-bit
5      unstructured 90%                  4-bit
=====  ================================  ======
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PapmError

SCHEDULES = ("oneshot", "iterative")
SPARSITY_MODES = ("none", "unstructured", "2:4")
WEIGHT_QUANT = ("rtn", "gptq")
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)
WEIGHT_ONLY_CRITERIA = ("l1", "random")  # what a cut with no data can use


@dataclass(frozen=True)
class Level:
    sparsity: str
    amount: float  # fraction of the conv weights zeroed (2:4: half by construction)
    weight_bits: int
    weight_quant: str = "rtn"

    @property
    def budget(self) -> float | None:
        """The budget this rung prunes to (None: the rung sets no budget of its own)."""
        return self.amount if self.sparsity == "unstructured" else None


LEVELS = {
    1: Level("none", 0.0, 8),
    2: Level("2:4", 0.5, 8),
    3: Level("unstructured", 0.75, 8),
    4: Level("unstructured", 0.75, 4),
    5: Level("unstructured", 0.90, 4),
}


def level_table() -> str:
    """The ladder as a Markdown table."""
    lines = ["| level | sparsity of the conv weights | weights |", "|---:|---|---|"]
    for k, lv in LEVELS.items():
        sparsity = {"none": "none", "2:4": "2:4 (50%)"}.get(lv.sparsity, f"unstructured {lv.amount:.0%}")
        lines.append(f"| {k} | {sparsity} | {lv.weight_bits}-bit, round to nearest |")
    return "\n".join(lines)


def check_compression(*, budget: float | None, criterion: str, schedule: str, steps: int, step_epochs: int,
                      data_free: bool, sparsity: str, weight_bits: int, weight_quant: str, level: int,
                      finetunes: bool, bn_recalibrate: bool, kd: bool) -> None:
    """Raise one clear PapmError for a bad value or a combination that does not make sense.

    ``budget`` is None where the mode sets its own (2:4, a level); ``finetunes``: whether the
    settings ask for fine-tuning (epochs > 0)."""
    if level and level not in LEVELS:
        raise PapmError(f"level must be 1..{max(LEVELS)}, got {level}; pick a rung of the ladder (0: no level)")
    if schedule not in SCHEDULES:
        raise PapmError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if sparsity not in SPARSITY_MODES:
        raise PapmError(f"unknown sparsity {sparsity!r}; choose one of {', '.join(SPARSITY_MODES)}")
    if isinstance(weight_bits, bool) or (weight_bits != 0 and weight_bits not in ALLOWED_BITS):
        raise PapmError(f"weight-bits must be one of {', '.join(map(str, ALLOWED_BITS))}, got {weight_bits}; "
                       "give one of them (or 0: fp32 weights)")
    if weight_quant not in WEIGHT_QUANT:
        raise PapmError(f"unknown weight quantiser {weight_quant!r}; choose rtn or gptq")
    if weight_quant != "rtn" and not weight_bits:
        raise PapmError(f"weight-quant {weight_quant} rounds weights to weight-bits; give weight-bits (e.g. 4)")
    if schedule == "iterative" and steps < 2:
        raise PapmError(f"schedule iterative needs steps >= 2 (cuts), got {steps}; give steps 2 or more, or schedule oneshot")
    if step_epochs < 0:
        raise PapmError(f"step-epochs must be >= 0, got {step_epochs}; 0 re-estimates BatchNorm only between cuts")
    if budget is not None and not 0.0 < budget < 1.0:
        raise PapmError(f"budget must be in (0, 1), got {budget}; give the fraction of parameters to remove, e.g. 0.77")
    if sparsity == "unstructured" and budget is None:
        raise PapmError("sparsity unstructured zeroes the budget's share of the weights; give a budget, e.g. 0.77")
    if sparsity != "none" and (schedule != "oneshot" or data_free):
        raise PapmError(f"sparsity {sparsity} zeroes weights in one step on the data; it does not combine with "
                        "schedule iterative or data-free (those cut channels)")
    if data_free:
        if budget is None or sparsity != "none":
            raise PapmError("data-free restores a channel cut; give a budget (and no level or sparsity)")
        if criterion not in WEIGHT_ONLY_CRITERIA:
            raise PapmError(f"data-free uses no data, and criterion {criterion} needs activations; use criterion l1 or random")
        if schedule != "oneshot" or finetunes or bn_recalibrate or kd:
            raise PapmError("data-free uses no data: it cuts once and cannot fine-tune, distil or re-estimate BatchNorm; "
                            "drop the schedule, fine-tuning epochs, kd and bn-recalibrate")
        if weight_bits and weight_quant == "gptq":
            raise PapmError("data-free uses no data and GPTQ calibrates on images; use weight-quant rtn")


def check_budget_reachable(budget: float, round_to: int, model_args: dict, image_size: int) -> None:
    """A channel cut's ``budget`` that no cut of this architecture reaches, refused before a run does any work (its
    prune phase would find it after the statistics, with the run folder then holding that config)."""
    from .pruning import largest_budget, largest_reduction

    most = largest_reduction(model_args, image_size, round_to)
    if budget > most:
        raise PapmError(f"budget={budget:g} cannot be met: keeping {round_to} channel(s) per layer of this ResNet-18 "
                        f"(width {model_args['width']:g}, {model_args['num_classes']} classes) removes at most {most:.4f} "
                        f"of its parameters; set budget <= {largest_budget(most):.3f}"
                        + (" or a smaller round-to" if round_to > 1 else ""))
