"""`papm prune` and `papm groups` (and the arguments `papm train` shares, in ``train_cli.py``): the method on one
machine with all the data in one place, no Flower: one group's compressed specialist (and its report), the
class-grouping report.

Parsers and the commands' printing live here; the work is a call into ``shared/`` (and the report writer in
``deploy/``), imported when a command runs, so building the parser imports neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..deploy.edge_cli import finite_number, non_negative_int, positive_int, positive_number


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--dataset", required=required, default=None,
                   help="digits (built in), cifar10, or imagefolder (with --data-root)" + ("" if required else "; default: the checkpoint's"))
    p.add_argument("--data-root", default=None, help="data folder for cifar10 / imagefolder")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if it is missing (needs network)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing output files, and start an interrupted "
                   "run over instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_prune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="prune a copy of the base model toward some classes to a parameter budget")
    p.add_argument("checkpoint", help="base checkpoint from `papm train`")
    _add_data_args(p, required=False)
    p.add_argument("--classes", required=True, help="the group's classes, ids or names: 3,5,8")
    p.add_argument("--budget", type=finite_number, default=None,
                   help="fraction of parameters to remove, in (0, 1): 0.77 keeps 23%% (with --sparsity unstructured: of the conv "
                        "weights to zero)")
    p.add_argument("--criterion", default=None, help="papm (default), l1, apoz or random (--data-free: l1 by default)")
    p.add_argument("--alpha", type=finite_number, default=None, help="PAPM weight of the L2 term (1 - alpha weighs 1 - APoZ); "
                   "default 0.5, only with --criterion papm")
    p.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of N (default 1)")
    p.add_argument("--apoz-samples", type=int, default=2048, help="group-class training samples used for APoZ")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default 5 (0 with --data-free)")
    p.add_argument("--finetune-lr", type=positive_number, default=0.02)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--emphasis", type=finite_number, default=4.0, help="weight of the group's classes vs the others (1 = none)")
    p.add_argument("--emphasis-mode", default="loss", help="loss (class-weighted loss) or sampling (weighted sampling)")
    p.add_argument("--kd", action="store_true", help="distil from the base model while fine-tuning")
    p.add_argument("--kd-weight", type=finite_number, default=0.5)
    p.add_argument("--kd-temperature", type=finite_number, default=4.0)
    p.add_argument("--schedule", default="oneshot", help="oneshot (one cut, default) or iterative (--steps cuts, APoZ re-measured)")
    p.add_argument("--steps", type=int, default=None, help="cuts of the iterative schedule (default 3)")
    p.add_argument("--step-epochs", type=int, default=None, help="fine-tuning epochs between two cuts of the iterative "
                   "schedule (default 1; 0: BatchNorm re-estimation only)")
    p.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BatchNorm statistics on the data after every cut, no gradient step (default on; "
                        "off with --data-free)")
    p.add_argument("--data-free", action="store_true",
                   help="use no data: cut by weights only and fold each removed channel into the next layer "
                        "(no fine-tuning); the test split only measures")
    p.add_argument("--sparsity", default="none",
                   help="none (channel pruning, default), unstructured (zero the --budget smallest weights) or 2:4")
    p.add_argument("--weight-bits", type=int, default=0, help="after fine-tuning, quantise weights to 2-8 bits, e.g. 8 or 4 "
                   "(evaluated in PyTorch; INT8 on ONNX Runtime is `papm export --int8`)")
    p.add_argument("--weight-quant", default="rtn", help="rtn (round to nearest, default) or gptq (error-compensating, "
                   "calibrated on the group's images)")
    p.add_argument("--level", type=int, default=0, help="compression level 1-5: a fixed ladder of sparsity and weight "
                   "bits (1: 8-bit; 2: 2:4 + 8-bit; 3: 75%% sparse + 8-bit; 4: 75%% + 4-bit; 5: 90%% + 4-bit)")
    p.add_argument("--out", default="pruned.pt", help="pruned checkpoint; the report goes beside it as <name>.json (and <name>.steps.csv)")
    _add_common(p)
    return p


def add_groups_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("groups", help="group the classes for K devices by how they co-vary in the model's outputs")
    g.add_argument("checkpoint", help="base checkpoint from `papm train`")
    _add_data_args(g, required=False)
    g.add_argument("--out", default="groups", help="report folder (groups.csv, groups.json, similarity.png, report.html)")
    g.add_argument("--similarity", default="correlation", help="correlation (default), cosine, covariance or confusion")
    g.add_argument("--outputs", default="softmax", help="class-mean softmax (default) or logits vectors")
    g.add_argument("--balanced", action="store_true", help="group sizes differ by at most one (equal work per device)")
    g.add_argument("--split", default="train", help="train (default) or val: where the statistics are computed (never test)")
    g.add_argument("--k", type=int, default=None, help="highlight this K (the number of devices) in the report")
    _add_common(g)
    return g


def _progress(args) -> bool | None:
    return False if args.quiet else None  # None: tqdm decides (bars on a terminal)


def run_prune(args) -> int:
    from ..deploy.bundle import sha256_file
    from ..shared.checkpoint import load_checkpoint, save_checkpoint
    from ..shared.datasets import load_dataset_like
    from ..shared.errors import PapmError, sigterm_as_interrupt
    from ..shared.files import atomic_write_csv, atomic_write_json, refuse_existing
    from ..shared.prune_pipeline import specialise
    from ..shared.specialise import PruneSettings, describe, parse_classes
    from ..shared.training import TrainSettings, resolve_device

    out = Path(args.out)
    report_path = out.with_suffix(".json")
    if report_path == out:
        report_path = out.with_name(out.name + ".report.json")
    if args.steps is not None and args.schedule != "iterative":
        raise PapmError(f"--steps {args.steps} needs --schedule iterative (a one-shot cut is one step)")
    if args.step_epochs is not None and args.schedule != "iterative":
        raise PapmError("--step-epochs is the fine-tuning between cuts: it needs --schedule iterative")
    channel_flags = [f for f, v in (("--criterion", args.criterion), ("--alpha", args.alpha), ("--round-to", args.round_to))
                     if v is not None]
    if channel_flags and (args.sparsity != "none" or args.level):
        raise PapmError(f"{', '.join(channel_flags)} choose channels to cut; with --sparsity or --level no channel is cut: "
                        "drop one or the other")
    if args.alpha is not None and (args.criterion or "papm") != "papm":
        raise PapmError(f"--alpha weighs PAPM's two terms; --criterion {args.criterion} has no alpha: drop --alpha")
    steps_path = report_path.with_name(report_path.stem + ".steps.csv")
    refuse_existing(out, report_path, steps_path, force=args.force)
    settings = PruneSettings(
        budget=args.budget, criterion=args.criterion or ("l1" if args.data_free else "papm"),
        alpha=0.5 if args.alpha is None else args.alpha, round_to=1 if args.round_to is None else args.round_to,
        apoz_samples=args.apoz_samples, emphasis=args.emphasis, emphasis_mode=args.emphasis_mode, kd=args.kd,
        kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, schedule=args.schedule,
        steps=3 if args.steps is None else args.steps,
        step_epochs=1 if args.step_epochs is None else args.step_epochs,
        bn_recalibrate=not args.data_free if args.bn_recalibrate is None else args.bn_recalibrate,
        data_free=args.data_free, sparsity=args.sparsity, weight_bits=args.weight_bits, weight_quant=args.weight_quant,
        level=args.level,
        finetune=TrainSettings(epochs=(0 if args.data_free else 5) if args.finetune_epochs is None else args.finetune_epochs,
                               lr=args.finetune_lr, batch_size=args.batch_size, warmup=0.1, seed=args.seed),
    ).validate()
    device = resolve_device(args.device)
    base, info, ckpt = load_checkpoint(args.checkpoint)
    if ckpt.get("kind") != "base":
        raise PapmError(f"{args.checkpoint} is a {ckpt.get('kind')} checkpoint; prune a base checkpoint from `papm train`")
    classes = parse_classes(args.classes, info)
    splits = load_dataset_like(info, args.dataset, args.data_root, args.download)
    print(f"compressing {args.checkpoint} toward classes {[info.class_names[c] for c in classes]}: {describe(settings)}")
    partial, resume, keep_state, done = _prune_progress(args, out, splits, classes, settings, device)
    try:
        with sigterm_as_interrupt():
            model, margs, report = specialise(base, ckpt["model_args"], splits, classes, settings, device,
                                              progress=_progress(args), on_state=keep_state, resume=resume)
    except KeyboardInterrupt:
        epochs = settings.finetune.epochs
        if partial.exists():
            said = (f"interrupted after {done[0]} of {epochs} fine-tuning epochs; run the same command again to go on "
                    f"from {partial} (the cut is kept)")
        elif settings.data_free or epochs == 0:
            said = "interrupted; nothing was saved (a prune without fine-tuning starts over: it is the short part)"
        else:
            said = f"interrupted before {'every' if settings.schedule == 'iterative' else 'the'} cut was made; nothing was saved"
        print(said, file=sys.stderr)
        return 130
    if not all(math.isfinite(row["loss"]) for row in report["history"]):
        partial.unlink(missing_ok=True)  # a diverged state is nothing to resume from
        raise PapmError(f"fine-tuning diverged at --finetune-lr {args.finetune_lr:g}; lower it and prune again (nothing was saved)")
    report["latency"] = _latency(base, model, info)
    report["base_checkpoint"] = str(args.checkpoint)
    report["checkpoint"] = str(out)
    save_checkpoint(out, model, margs, info, kind="pruned",
                    meta={"classes": classes, "base_checkpoint": str(args.checkpoint),
                          # where the base is and which file it was: `papm export pruned.pt` adds it to the bundle
                          "base_checkpoint_path": str(Path(args.checkpoint).resolve()), "base_sha256": sha256_file(args.checkpoint),
                          "reduction": report["reduction"], "criterion": settings.criterion, "alpha": settings.alpha,
                          "sparsity": settings.sparsity, "weight_bits": settings.weight_bits, "data_free": settings.data_free})
    atomic_write_json(report_path, report)
    atomic_write_csv(steps_path, report["steps"])
    partial.unlink(missing_ok=True)
    acc = report["accuracy"]
    size = report["size"]
    print(f"params {report['params_before']:,} -> {report['params_after']:,} ({report['nonzero_params']:,} non-zero; "
          f"reduction {report['reduction']:.4f}); MACs {report['macs_before']:,} -> {report['macs_after']:,}; "
          f"the fp32 weights zlib-compressed: {size['compressed_bytes'] / 1024:.1f} KiB")
    labels = {"base": "base", "before_finetune": "after the cut" + (" + restoration" if settings.data_free else ""),
              "after_bn_recalibrate": "+ BatchNorm re-estimated", "after_finetune": "+ fine-tuned",
              "after_weight_quant": f"+ {settings.weight_bits}-bit weights"}
    print("test accuracy                 all classes   group classes")
    for key in acc:
        if key == "after_finetune" and not report["history"]:
            continue  # no fine-tuning step was taken: the row would repeat the one above
        print(f"  {labels.get(key, key):<27} {acc[key]['all']:>10.4f}   {acc[key]['group']:>12.4f}")
    if len(report["steps"]) > 1:
        print("iterative schedule (group-class accuracy)   after the cut   + BatchNorm   + step fine-tune")
        for row in report["steps"]:
            cells = [row.get(k) for k in ("after_cut_group", "after_bn_group", "after_step_finetune_group")]
            print(f"  step {row['step']}: {row['params']:>10,} parameters      " +
                  "   ".join(f"{c:>11.4f}" if c is not None else f"{'-':>11}" for c in cells))
    lat = report["latency"]
    if lat.get("pruned_ms") is not None:
        print(f"latency ({lat['measured']}): base {lat['base_ms']:.3f} ms, pruned {lat['pruned_ms']:.3f} ms "
              f"({lat['pruned_ms'] / lat['base_ms']:.2f}x)")
    if report["dense_runtime_note"]:
        print(f"note: {report['dense_runtime_note']}")
    print(f"saved {out}, {report_path} and {steps_path}")
    return 0


def _prune_progress(args, out: Path, splits, classes: list[int], settings, device):
    """``papm prune``'s progress beside ``--out`` (as ``papm train``'s): the cut model once it is made, then every
    fine-tuning epoch. Returns (its path, the state to resume from or None, the saver, [fine-tuning epochs done])."""
    import hashlib
    from dataclasses import asdict

    from ..deploy.bundle import sha256_file
    from ..shared.checkpoint import moved_device_warning, save_training_state, training_progress, training_state_path

    info = splits.info
    images = hashlib.sha256()  # the photos themselves: a folder whose images changed but not their count is other data
    for part in (splits.train, splits.val, splits.test):
        images.update(part.x.numpy().tobytes())
        images.update(part.y.numpy().tobytes())
    command = {"checkpoint_sha256": sha256_file(args.checkpoint), "dataset": info.name,
               "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
               "classes": classes, "image_size": info.image_size, "train_images": len(splits.train),
               "images_sha256": images.hexdigest(),
               **{k: v for k, v in asdict(settings).items() if k != "finetune"},
               **{f"finetune_{k}": v for k, v in asdict(settings.finetune).items()}}
    partial = training_state_path(out)
    resume, saved_on = training_progress(out, command, force=args.force, tool="prune")
    done = [resume["fit"]["epoch"] if resume and resume["fit"] else 0]
    if resume:
        print(f"resuming from {partial}: the cut is made, {done[0]} of {settings.finetune.epochs} fine-tuning epochs "
              "were done")
        if moved := moved_device_warning(partial, saved_on, device):
            print(moved, file=sys.stderr)

    def keep_state(state: dict) -> None:
        save_training_state(partial, command, state, tool="prune", device=device)
        done[0] = state["fit"]["epoch"] if state["fit"] else 0

    return partial, resume, keep_state, done


def _latency(base, model, info) -> dict:
    """The base and the compressed model on ONNX Runtime (fp32, CPU, batch 1, 1 thread, median of 50 calls):
    what a dense edge runtime makes of the compression. An export that fails leaves the numbers out, with why."""
    import platform

    import onnxruntime
    import torch

    from ..export.onnx_export import onnx_latency_ms
    from ..shared.errors import PapmError

    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    measured = (f"ONNX Runtime {onnxruntime.__version__} fp32, CPU {platform.machine()}, batch 1, 1 thread, "
                "median of 50 calls, the two alternating")
    try:
        ms = onnx_latency_ms({"base": base, "pruned": model}, example)
        return {"base_ms": round(ms["base"], 4), "pruned_ms": round(ms["pruned"], 4), "measured": measured}
    except PapmError as e:
        return {"base_ms": None, "pruned_ms": None, "measured": measured, "error": str(e)}


def run_groups(args) -> int:
    from ..shared.group_report import REPORT_FILES, terminal_table, write_group_report
    from ..shared.checkpoint import load_checkpoint
    from ..shared.class_stats import compute_class_stats
    from ..shared.datasets import load_dataset_like
    from ..shared.errors import PapmError
    from ..shared.files import refuse_existing
    from ..shared.grouping import SIMILARITIES, analyse_stats, check_k
    from ..shared.training import resolve_device

    if args.similarity not in SIMILARITIES:
        raise PapmError(f"unknown similarity {args.similarity!r}; choose one of {', '.join(SIMILARITIES)}")
    if args.outputs not in ("softmax", "logits"):
        raise PapmError(f"unknown outputs {args.outputs!r}; choose softmax or logits")
    if args.split not in ("train", "val"):
        raise PapmError(f"--split must be train or val (statistics never use the test split), got {args.split!r}")
    out = Path(args.out)
    refuse_existing(*(out / f for f in REPORT_FILES), force=args.force)
    device = resolve_device(args.device)
    model, info, _ = load_checkpoint(args.checkpoint)
    if args.k is not None:
        check_k(args.k, info.num_classes)
    splits = load_dataset_like(info, args.dataset, args.data_root, args.download)
    data = splits.train if args.split == "train" else splits.val
    stats = compute_class_stats(model, data, info, device)
    analysis = analyse_stats(stats, info.class_names, args.similarity, args.outputs, args.balanced)
    analysis.extra.update({"checkpoint": str(args.checkpoint), "split": args.split})
    write_group_report(out, analysis, chosen_k=args.k)
    print(terminal_table(analysis, max_k=12))
    print(f"report: {(out / 'report.html').resolve()}")
    return 0
