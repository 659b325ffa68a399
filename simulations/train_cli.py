"""`papm train`: the base model on one machine, with all the data in one place (no Flower), resumable after an
interruption from its last finished epoch.

Like ``centralised_cli.py``: the parser and the printing live here, the work is a call into ``shared/``, imported when
the command runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..deploy.edge_cli import finite_number, fraction, positive_int, positive_number
from .centralised_cli import _add_common, _add_data_args, _progress


def add_train_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train the base ResNet-18 and save a self-describing checkpoint")
    _add_data_args(t, required=True)
    t.add_argument("--width", type=finite_number, default=1.0, help="width multiplier (1.0 = 11.17M parameters at 10 classes)")
    t.add_argument("--epochs", type=positive_int, default=15)
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--lr", type=positive_number, default=0.05)
    t.add_argument("--weight-decay", type=fraction, default=5e-4)
    t.add_argument("--label-smoothing", type=fraction, default=0.0)
    t.add_argument("--val-fraction", type=finite_number, default=0.1, help="share of train held out for model selection")
    t.add_argument("--image-size", type=int, default=0,
                   help="images are resized (short side) and centre-cropped to this square size, 8-512 "
                        "(default: the dataset's own; 32 for imagefolder)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=0, help="1 (grey) or 3 (RGB) (default: the dataset's own)")
    t.add_argument("--out", default="base.pt")
    _add_common(t)
    return t


def run_train(args) -> int:
    import torch

    from ..shared.checkpoint import (moved_device_warning, save_checkpoint, save_training_state, training_progress,
                                     training_state_path)
    from ..shared.datasets import load_dataset
    from ..shared.errors import sigterm_as_interrupt
    from ..shared.files import refuse_existing
    from ..shared.models import ResNet18, count_params, model_args
    from ..shared.training import TrainSettings, batch_bounds, evaluate, fit, resolve_device

    out = Path(args.out)
    refuse_existing(out, force=args.force)
    if not 0 < args.width <= 16:
        from ..shared.errors import PapmError

        raise PapmError(f"--width must be in (0, 16], got {args.width:g}; 1.0 is the standard ResNet-18, 0.25 a small one")
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                             label_smoothing=args.label_smoothing, seed=args.seed).validate()
    device = resolve_device(args.device)
    splits = load_dataset(args.dataset, args.data_root, split_seed=args.seed, val_fraction=args.val_fraction,
                          download=args.download, image_size=args.image_size, in_channels=args.channels)
    info = splits.info
    torch.manual_seed(args.seed)
    margs = model_args(info.num_classes, info.in_channels, args.width)
    model = ResNet18(info.num_classes, info.in_channels, args.width)
    print(f"training ResNet-18 x{args.width:g} ({count_params(model):,} params) on {info.name}: "
          f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, {info.num_classes} classes, "
          f"{info.in_channels}x{info.image_size}x{info.image_size}, device {device}")
    if len(splits.test) and (unmeasured := splits.test.classes_without_images(info)):
        print(f"warning: test/ holds no images of {', '.join(unmeasured)}: their test accuracy is not measured; add some "
              "to test/<class>/", file=sys.stderr)
    steps = len(batch_bounds(len(splits.train), settings.batch_size))
    if steps < 10:  # a few hundred photos at the default batch: a handful of steps in all, a model at chance
        smaller = max(8, 2 ** int(math.log2(max(1, len(splits.train) // 10))))
        fix = (f"a smaller batch (e.g. --batch-size {smaller}) or more --epochs" if smaller < settings.batch_size
               else "more --epochs or more images")
        print(f"warning: {len(splits.train)} training images at --batch-size {settings.batch_size} make {steps} step(s) "
              f"per epoch, {steps * settings.epochs} in all; a small set trains better with {fix}", file=sys.stderr)
    # an interrupted run keeps its last finished epoch beside --out; the same command goes on from there (exactly)
    partial = training_state_path(out)
    command = {"dataset": info.name, "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
               "classes": list(info.class_names), "image_size": info.image_size, "channels": info.in_channels,
               "train_images": len(splits.train), "mean": list(info.mean), "std": list(info.std), "width": args.width,
               "val_fraction": args.val_fraction, **vars(settings)}
    resume, saved_on = training_progress(out, command, force=args.force)
    done = [resume["epoch"] if resume else 0]
    if resume:
        print(f"resuming from {partial}: {done[0]} of {settings.epochs} epochs were done")
        if moved := moved_device_warning(partial, saved_on, device):
            print(moved, file=sys.stderr)

    def keep_state(state: dict) -> None:
        save_training_state(partial, command, state, device=device)
        done[0] = state["epoch"]

    try:
        with sigterm_as_interrupt():
            history = fit(model, splits.train, info, settings, device, val=splits.val, progress=_progress(args),
                          on_state=keep_state, resume=resume)
    except KeyboardInterrupt:
        print(f"interrupted after {done[0]} of {settings.epochs} epochs; " + (
            f"run the same command again to go on from {partial}" if done[0] else "nothing was saved"), file=sys.stderr)
        return 130
    if not all(math.isfinite(row["loss"]) for row in history):
        from ..shared.errors import PapmError

        partial.unlink(missing_ok=True)  # a diverged state is nothing to resume from
        raise PapmError(f"training diverged (loss {history[-1]['loss']} after epoch {len(history)}) at --lr {args.lr:g}; "
                        "lower --lr and train again (nothing was saved)")
    val_acc = evaluate(model, splits.val, info, device)["accuracy"] if len(splits.val) else None
    test = evaluate(model, splits.test, info, device)
    meta = {"history": history, "val_accuracy": val_acc, "test_accuracy": test["accuracy"] if len(splits.test) else None,
            "per_class_test_accuracy": {info.class_names[c]: a for c, a in test["per_class"].items()},
            "train_settings": vars(settings).copy()}
    save_checkpoint(out, model, margs, info, kind="base", meta=meta)
    partial.unlink(missing_ok=True)
    val_text = (f"val accuracy {val_acc:.4f}" if len(splits.val)
                else "no validation split (--val-fraction 0): the last epoch's weights are kept")
    if len(splits.test):
        print(f"{val_text}  test accuracy {test['accuracy']:.4f}")
    else:  # a tree with train/ only: the validation split is all there is to report
        print(f"{val_text}  (no test split: {args.data_root}/test/<class>/ is missing, test accuracy not measured)")
    print(f"saved {out}")
    return 0
