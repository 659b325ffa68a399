"""Peak memory of one device: a node that holds a share of the training set as its own ImageFolder tree
(as a SuperNode does), doing each phase's heavy work once, in one fresh process.

    python benchmarks/bench_device_memory.py --base base.pt --data-root data/cifar10 --share 3 --devices 2

The device tree is every ``share``-th training image of ``data-root`` (symbolic links in a temporary
folder: a third of CIFAR-10's training set with ``--share 3``). The process then runs what the
ClientApp handlers run on a node, with the same functions: decode its tree, class statistics of the
base model on all its images, APoZ counts for each group, ``--steps`` fine-tuning steps of each
group's pruned model, BatchNorm sums, and the features of all K extractors on its images (the
fusion phase). Peak memory does not grow with the number of steps, so a few steps measure it.
Reports the peak resident set size (``ru_maxrss``) and writes benchmarks/bench_device_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_record import record

WORK = r'''
import copy, json, resource, sys, time
import torch
from papm.shared.bn import bn_input_sums
from papm.shared.checkpoint import load_checkpoint
from papm.shared.class_stats import compute_class_stats
from papm.shared.config import RunConfig
from papm.shared.datasets import normalise
from papm.shared.node_data import load_node_data
from papm.shared.specialise import PruneSettings, finetune_local, local_apoz_counts, prune_model
from papm.shared.training import TrainSettings

base_path, tree, devices, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
t0, marks = time.time(), {}
base, info, ckpt = load_checkpoint(base_path)
cfg = RunConfig.from_mapping({"dataset": "imagefolder", "data-root": tree, "image-size": info.image_size,
                              "channels": info.in_channels, "devices": devices, "nodes": devices})
data = load_node_data(cfg, 0, 1, own_data_root=tree)
marks["decoded"] = peak()
compute_class_stats(base, data.train, info)
marks["class statistics"] = peak()
groups = [list(range(info.num_classes))[g::devices] for g in range(devices)]
models = []
for g, classes in enumerate(groups):
    counts, _ = local_apoz_counts(base, data.train, info, classes, 2048, 0)
    model = copy.deepcopy(base)
    prune_model(model, ckpt["model_args"], info, PruneSettings(budget=0.77), counts)
    models.append(model)
marks["apoz + cut"] = peak()
for g, model in enumerate(models):
    finetune_local(model, data.train, info, groups[g], TrainSettings(epochs=0, steps=steps, lr=0.02, select_on_val=False),
                   4.0, "loss")
    bn_input_sums(model, data.train.sample(2048, 0), info)
marks["fine-tune + BatchNorm sums"] = peak()
feats = []
with torch.no_grad():
    for i in range(0, len(data.train), 512):
        x = normalise(data.train.x[i:i + 512], info)
        feats.append(torch.cat([m.eval().features(x) for m in models], dim=1))
feats = torch.cat(feats)
marks["fusion features"] = peak()
print(json.dumps({"images": len(data.train), "image_bytes": data.train.x.numel(), "feature_dims": int(feats.shape[1]),
                  "peak_mib": round(peak(), 1), "after": {k: round(v, 1) for k, v in marks.items()},
                  "seconds": round(time.time() - t0, 1)}))
'''


def device_tree(data_root: Path, share: int, dest: Path) -> int:
    """Every ``share``-th image of each class of data_root/train, linked into dest/train/<class>/."""
    n = 0
    for cls in sorted(p for p in (data_root / "train").iterdir() if p.is_dir()):
        out = dest / "train" / cls.name
        out.mkdir(parents=True)
        for f in sorted(cls.iterdir())[::share]:
            os.symlink(f.resolve(), out / f.name)
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base checkpoint (its image size and classes)")
    ap.add_argument("--data-root", required=True, help="ImageFolder root with train/<class>/")
    ap.add_argument("--share", type=int, default=3, help="the device holds every N-th training image (default 3)")
    ap.add_argument("--devices", type=int, default=2, help="K: groups whose models the device works on")
    ap.add_argument("--steps", type=int, default=20, help="fine-tuning steps per group model")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        linked = device_tree(Path(args.data_root), args.share, Path(tmp) / "device")
        print(f"device tree: {linked} training images (every {args.share}th of {args.data_root}/train)")
        r = subprocess.run([sys.executable, "-c", WORK, args.base, str(Path(tmp) / "device"), str(args.devices),
                            str(args.steps)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the device process failed:\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for stage, mib in result["after"].items():
        print(f"  after {stage:<28} peak {mib:8.1f} MiB")
    print(f"one device, {result['images']} images: peak {result['peak_mib']} MiB ({result['seconds']} s)")
    command = (f"python benchmarks/bench_device_memory.py --base {args.base} --data-root {args.data_root} "
               f"--share {args.share} --devices {args.devices} --steps {args.steps}")
    row = {"date": time.strftime("%Y-%m-%d"), "command": command, "images": result["images"], "devices": args.devices,
           "peak_mib": result["peak_mib"], "stages": result["after"], "seconds": result["seconds"]}
    js, md = record(args.out, "bench_device_memory", row, {"date": "date", "command": "command", "images": "images",
                                                            "K": "devices", "peak MiB": "peak_mib"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
