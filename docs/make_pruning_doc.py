"""Generate docs/pruning.md: a one-page pruning walkthrough whose numbers come from real runs.

    python docs/make_pruning_doc.py            # writes docs/pruning.md (a few minutes on 2 CPU cores)
    python docs/make_pruning_doc.py --out X.md

The page's prose is the template below. Every ``@@run NAME@@`` line becomes the command
of step NAME and the output it printed; every ``{{NAME.fact}}`` is a number read from that
step's report (``<out>.json``). The commands run in order, in a fresh temporary folder, as
``python -m papm.cli ...`` with the interpreter running this script, on the CPU (CUDA is
hidden from them). A command that fails stops the script and no page is written. The page
is written atomically. Never edit docs/pruning.md by hand: change this file and run it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "pruning.md"

PRUNE = ["prune", "base.pt", "--classes", "3,5,8"]

# name -> (papm arguments, output checkpoint whose .json report the prose may quote, keep "saved ..." lines)
STEPS: dict[str, tuple[list[str], str | None, bool]] = {
    "train": (["train", "--dataset", "digits", "--width", "0.25", "--epochs", "10", "--out", "base.pt", "--quiet"],
              None, True),
    "papm": (PRUNE + ["--budget", "0.77", "--out", "papm.pt", "--quiet"], "papm.pt", True),
    "l1": (PRUNE + ["--budget", "0.77", "--criterion", "l1", "--out", "l1.pt", "--quiet"], "l1.pt", False),
    "apoz": (PRUNE + ["--budget", "0.77", "--criterion", "apoz", "--out", "apoz.pt", "--quiet"], "apoz.pt", False),
    "iter": (PRUNE + ["--budget", "0.77", "--schedule", "iterative", "--steps", "3", "--out", "iter.pt", "--quiet"],
             "iter.pt", False),
    "free": (PRUNE + ["--budget", "0.3", "--data-free", "--out", "free.pt", "--quiet"], "free.pt", False),
    "plain": (PRUNE + ["--budget", "0.3", "--criterion", "l1", "--no-bn-recalibrate", "--finetune-epochs", "0",
                       "--out", "plain.pt", "--quiet"], "plain.pt", False),
    "unstructured": (PRUNE + ["--budget", "0.77", "--sparsity", "unstructured", "--out", "unstructured.pt", "--quiet"],
                     "unstructured.pt", False),
    "two4": (PRUNE + ["--sparsity", "2:4", "--out", "two4.pt", "--quiet"], "two4.pt", False),
    "rtn4": (PRUNE + ["--budget", "0.77", "--weight-bits", "4", "--out", "rtn4.pt", "--quiet"], "rtn4.pt", False),
    "gptq4": (PRUNE + ["--budget", "0.77", "--weight-bits", "4", "--weight-quant", "gptq", "--out", "gptq4.pt",
                       "--quiet"], "gptq4.pt", False),
    "level4": (PRUNE + ["--level", "4", "--out", "level4.pt", "--quiet"], "level4.pt", False),
}

# Rows of the closing table: step name -> what it is.
SUMMARY = {
    "papm": "channels, one-shot, PAPM",
    "l1": "channels, one-shot, L1",
    "apoz": "channels, one-shot, APoZ",
    "iter": "channels, 3 steps, PAPM",
    "unstructured": "unstructured 77%",
    "two4": "2:4",
    "rtn4": "channels PAPM + 4-bit RTN",
    "gptq4": "channels PAPM + 4-bit GPTQ",
    "level4": "level 4",
}

TEMPLATE = """\
# Pruning, step by step

{{header}}

Pruning removes parts of a trained network so that it needs less memory or less compute.
A short retraining (fine-tuning) then wins back some accuracy. Four ideas:

- **Structured vs unstructured.** Structured (channel) pruning removes whole channels of
  the convolutions. The result is a smaller dense network: fewer parameters, fewer
  multiply-accumulates (MACs), faster on any runtime. Unstructured pruning sets single
  weights to zero and keeps every shape: the file compresses better, but a dense runtime
  does the same work. 2:4 sparsity is in between: 2 of every 4 weights are zero.
- **One-shot vs iterative.** One-shot cuts to the target at once, then fine-tunes.
  Iterative cuts in several smaller steps, with a short fine-tune between them.
- **APoZ** (average percentage of zeros) of a channel is the share of its outputs after
  the ReLU that are exactly zero on a set of images. A channel that is nearly always zero
  passes little on, so a high APoZ marks it for removal.
- **PAPM score** of a channel: `alpha * ||W_c|| / max ||W|| + (1 - alpha) * (1 - APoZ_c)`.
  The first term is the filter's L2 norm divided by the largest in its layer (how big the
  weights are); the second is how often the channel is active. Both lie in 0..1; the
  lowest-scoring channels of the whole network are removed first. `alpha` defaults to 0.5.

Here the pruned model is for a device that cares about three classes, the digits 3, 5
and 8 (its "group"). APoZ is counted on training images of those classes only, so a
channel that only matters for other digits scores low. All commands use scikit-learn's
built-in 8x8 digits (no download) and were run in this order in an empty folder.

## 1. Train a base model

@@run train@@

A ResNet-18 at a quarter of the usual width. The checkpoint records the dataset, the
classes and the normalisation, so later commands need only `base.pt`.

## 2. Channel pruning, one-shot, PAPM score

@@run papm@@

`--budget 0.77` is the share of parameters to **remove**; 23% stay. The first line of
numbers shows the model really got smaller: fewer parameters and fewer MACs (the work
for one image). The accuracy table has two columns: all 10 classes, and only the group's
classes (the number this device cares about). Its rows:

- `base`: the model before pruning.
- `after the cut`: right after the cut. It can drop a long way, even to chance.
- `+ BatchNorm re-estimated`: after BatchNorm re-estimation. BatchNorm layers store the mean
  and variance of their inputs; a cut changes those inputs. Passing training images
  through the model (no weight update) renews the stored statistics.
- `+ fine-tuned`: after 5 epochs of training from the kept weights, with the group's
  classes weighted 4 times in the loss.

The `latency` line times one image through ONNX Runtime (fp32, one thread), the base and the
pruned model exported to ONNX and called in turn: here {{papm.pruned_ms}} ms pruned against
{{papm.base_ms}} ms for the base. On 8x8 images a call is mostly ONNX Runtime's fixed cost per
layer, not arithmetic, so a smaller model need not be faster, and channel counts that are not
multiples of 8 miss its fastest x86 kernels. On 32x32 photos the arithmetic dominates: the same
cut of a CIFAR-10 model (width 0.25, four classes) ran in 0.70x of the base's time, and in 0.60x
with `--round-to 8` (channel counts kept multiples of 8; `benchmarks/RESULTS.md`).

`papm.json` holds the full report (channels kept per layer, per-class accuracy).

## 3. What the score measures

@@run l1@@

@@run apoz@@

Same budget; only the ranking of the channels changes. `l1` is the weight term alone
(`alpha` = 1): big filters stay, whatever the images. `apoz` is the activity term alone
(`alpha` = 0): channels that fire often on 3, 5 and 8 stay, whatever their size. PAPM at
0.5 averages the two; `--alpha` changes the mix, and only affects `--criterion papm`.
The budget fixes the parameter count, not the MACs: the criteria keep channels in
different layers, so the MACs differ ({{l1.macs_after}} for L1, {{apoz.macs_after}} for
APoZ, {{papm.macs_after}} for PAPM).

## 4. Iterative pruning

@@run iter@@

Three cuts instead of one; each removes the same share of what is left. Between cuts the
model gets 1 epoch of fine-tuning (`--step-epochs`; 0: BatchNorm re-estimation only), and
APoZ is counted again on the smaller model, since a removed channel changes what the next
layer sees. A step line gives the group accuracy right after that cut; the table's
`after the cut` and `+ BatchNorm re-estimated` rows are the last cut. Group accuracy at the
end: {{iter.final_group}} here, {{papm.final_group}} one-shot. Which wins depends on the
model and the budget; iterative always takes longer.

## 5. Pruning without data

@@run free@@

@@run plain@@

A device with no images cannot count APoZ, re-estimate BatchNorm or fine-tune. Both
commands rank channels by weight norm only (`l1`) and remove the same ones, 30% of the
parameters: without fine-tuning a big cut does not recover. `--data-free` then repairs the
model from its weights: each removed channel is approximated by the kept ones and folded
into the next layer, and the BatchNorm statistics it disturbed are corrected. The second
command is the plain cut. Neither fine-tunes, so the table ends after the cut; the test
images only measure. Group accuracy: {{free.final_group}}
repaired, {{plain.final_group}} plain.

## 6. Unstructured and 2:4 sparsity

@@run unstructured@@

@@run two4@@

The parameter count and the MACs stay: every weight is still there, some are zero. What
shrinks is the number of non-zero weights and the compressed file ("zlib-compressed
weights": {{unstructured.kib}} KiB unstructured, {{two4.kib}} KiB 2:4, against
{{papm.kib}} KiB for the channel-pruned model of step 2). Unstructured pruning zeroes the
smallest weights of the whole network; the last layer, the biases and BatchNorm stay
dense, so the reduction is a little under the budget. 2:4 takes no budget: half the
weights by construction (the first layer, with one input channel, and the last layer
stay dense).

Dense ONNX Runtime is **not** faster with unstructured or 2:4 sparsity: it multiplies the
zeros like any other number. Only channel pruning makes the dense model smaller and
faster. (2:4 can run faster on GPUs with sparse tensor cores, through TensorRT.)

## 7. Low-bit weights and the compression levels

@@run rtn4@@

@@run gptq4@@

After fine-tuning, `--weight-bits 4` rounds every weight to one of 15 values per output
channel (-7..7 times a scale). `rtn` rounds each weight to the nearest value. `gptq`
rounds column by column and moves each rounding error onto weights not yet rounded, so
that each layer's outputs on {{gptq4.calibration}} of the group's training images change as little
as possible. Group accuracy after rounding: {{rtn4.final_group}} RTN, {{gptq4.final_group}}
GPTQ. Rounding also sends small weights to zero, hence fewer non-zero weights.

The weights are stored as 32-bit floats holding the rounded values, so only the
compressed size drops. Bit widths below 8 are evaluated in PyTorch: ONNX Runtime has no
kernels for them. For INT8 through ONNX Runtime use `papm export --int8`.

`--level` names common mixes of sparsity and bit width:

{{levels}}

@@run level4@@

## Summary

{{summary}}

Accuracy is the last row of each table (after fine-tuning, or after rounding the
weights). One seed on a small test split: differences of a point or two are noise.
"""

PROGRESS = re.compile(r"(\d+%\|)|(\bit/s\b)|(\bs/it\b)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def clean(stdout: str, keep_saved: bool) -> str:
    """Drop progress-bar noise (and, where asked, the `saved ...` lines) from a command's output."""
    lines = []
    for raw in stdout.splitlines():
        line = raw.split("\r")[-1].rstrip()  # a bar redraws itself after carriage returns
        if not line or PROGRESS.search(line):
            continue
        if not keep_saved and line.startswith("saved "):
            continue
        lines.append(line)
    return "\n".join(lines)


def run_step(name: str, args: list[str], workdir: Path, env: dict) -> tuple[str, float]:
    shown = "papm " + shlex.join(args)
    print(f"[{name}] {shown}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "papm.cli", *args], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: step {name!r} ran over 900 s: {shown}; no page written") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise SystemExit(f"error: step {name!r} failed with exit code {proc.returncode}: {shown}\n{tail}\n"
                         "no page written")
    print(f"[{name}] {seconds:.1f} s", file=sys.stderr, flush=True)
    return proc.stdout, seconds


def facts(report: dict) -> dict[str, str]:
    """Numbers the prose and the summary quote, formatted, from one `papm prune` report."""
    acc = report["accuracy"]
    final = acc[list(acc)[-1]]
    return {
        "params_after": f"{report['params_after']:,}",
        "nonzero": f"{report['nonzero_params']:,}",
        "macs_after": f"{report['macs_after']:,}",
        "kib": f"{report['size']['compressed_bytes'] / 1024:.1f}",
        "final_group": f"{final['group']:.4f}",
        "final_all": f"{final['all']:.4f}",
        "calibration": str(report.get("weights", {}).get("calibration_samples", "none")),
        "base_ms": f"{report['latency'].get('base_ms') or float('nan'):.3f}",
        "pruned_ms": f"{report['latency'].get('pruned_ms') or float('nan'):.3f}",
    }


def summary_table(reports: dict[str, dict]) -> str:
    rows = ["| what | parameters | non-zero | MACs | zlib KiB | accuracy, group | accuracy, all |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, what in SUMMARY.items():
        f = facts(reports[name])
        rows.append(f"| {what} | {f['params_after']} | {f['nonzero']} | {f['macs_after']} | {f['kib']} | "
                    f"{f['final_group']} | {f['final_all']} |")
    return "\n".join(rows)


def level_table() -> str:
    """The compression-level ladder as the code defines it."""
    from papm.shared.compression_options import level_table as table

    return table()


def header(total: float, threads: str) -> str:
    return (f"*Generated by `python docs/make_pruning_doc.py` on {dt.date.today().isoformat()}, on "
            f"{cpu_model()} ({cores()} cores, OMP_NUM_THREADS={threads}, CPU only), "
            f"papm {version('papm-fl')}, torch {version('torch')}, Python {platform.python_version()}. "
            f"All commands together took {total:.0f} s. Do not edit the numbers: run the script again.*")


def render(outputs: dict[str, tuple[str, float]], reports: dict[str, dict], total: float, levels: str,
           threads: str) -> str:
    values = {"header": header(total, threads), "levels": levels, "summary": summary_table(reports)}
    for name, report in reports.items():
        for key, value in facts(report).items():
            values[f"{name}.{key}"] = value

    def placeholder(m: re.Match) -> str:
        if m.group(1) not in values:
            raise SystemExit(f"error: the template names {{{{{m.group(1)}}}}}, which no step provides")
        return values[m.group(1)]

    def block(m: re.Match) -> str:
        name = m.group(1)
        args, _, _ = STEPS[name]
        text, seconds = outputs[name]
        return (f"```console\n$ papm {shlex.join(args)}\n{text}\n```\n"
                f"*{seconds:.1f} s*")

    page = re.sub(r"\{\{([\w.]+)\}\}", placeholder, TEMPLATE)
    page = re.sub(r"^@@run (\w+)@@$", block, page, flags=re.M)
    if "@@" in page or "{{" in page:
        raise SystemExit("error: the template has an unfilled marker")
    return page


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"page to write (default {DEFAULT_OUT})")
    out = parser.parse_args().out
    used = set(re.findall(r"^@@run (\w+)@@$", TEMPLATE, flags=re.M))
    if used != set(STEPS):
        raise SystemExit(f"error: the template and STEPS disagree: {sorted(used ^ set(STEPS))}")
    levels = level_table()  # before the commands, so a missing ladder fails in seconds
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the page is about a CPU
    # The thread count changes the order of float sums, and on digits that alone moves the base by points
    # (measured: 98.05% test accuracy on one thread, 94.99% on two); one thread unless asked makes the page repeatable.
    env.setdefault("OMP_NUM_THREADS", "1")
    outputs, reports = {}, {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="papm-pruning-doc-") as tmp:
        workdir = Path(tmp)
        for name, (args, checkpoint, keep_saved) in STEPS.items():
            stdout, seconds = run_step(name, args, workdir, env)
            outputs[name] = (clean(stdout, keep_saved), seconds)
            if checkpoint is not None:
                report = workdir / Path(checkpoint).with_suffix(".json")
                if not report.is_file():
                    raise SystemExit(f"error: step {name!r} wrote no report {report.name}; no page written")
                reports[name] = json.loads(report.read_text())
    total = time.perf_counter() - t0
    write_atomic(out, render(outputs, reports, total, levels, env["OMP_NUM_THREADS"]))
    print(f"wrote {out} ({total:.0f} s of commands)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
