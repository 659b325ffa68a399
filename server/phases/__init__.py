"""One module per phase of a run; each has one entry point, ``run(driver)``.

A phase reads its inputs from the run directory (``driver.rd``) and writes its outputs
there; the driver marks it complete afterwards, so a phase that is done is never rerun.
"""

from . import assignment, base, bundle, evaluation, export, fusion, prune, statistics

PHASE_RUNNERS = {
    "base": base.run,
    "statistics": statistics.run,
    "assignment": assignment.run,
    "prune": prune.run,
    "export": export.run,
    "fusion": fusion.run,
    "evaluation": evaluation.run,
    "bundle": bundle.run,
}
