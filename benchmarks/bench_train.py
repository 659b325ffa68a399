"""Training-loop throughput: the project's loop (`papm.shared.training.fit`) against a
plain PyTorch loop (DataLoader + per-image torchvision transforms) on the same model,
data, batch size and device.

    python benchmarks/bench_train.py                    # digits, width 0.25, CPU
    python benchmarks/bench_train.py --dataset cifar10 --data-root DIR --width 1.0 --device cuda

Prints images/s of both and their ratio, and writes benchmarks/bench_train.json and
appends a row to benchmarks/bench_train.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from papm.shared.datasets import load_dataset
from papm.shared.models import ResNet18
from papm.shared.training import TrainSettings, fit, resolve_device
from bench_record import record


def plain_loop(model, splits, epochs, batch_size, device) -> float:
    """The textbook loop: a Dataset with per-image transforms, a DataLoader, SGD. Returns img/s."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    info = splits.info
    tf = [v2.RandomCrop(info.image_size, padding=info.crop_padding)]
    if info.hflip:
        tf.append(v2.RandomHorizontalFlip())
    tf += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    transform = v2.Compose(tf)

    class Images(Dataset):
        def __len__(self):
            return len(splits.train)

        def __getitem__(self, i):
            return transform(splits.train.x[i]), splits.train.y[i]

    loader = DataLoader(Images(), batch_size=batch_size, shuffle=True, drop_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.to(device).train()
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def project_loop(model, splits, epochs, batch_size, device) -> float:
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, select_on_val=False)
    t0 = time.perf_counter()
    fit(model, splits.train, splits.info, settings, device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs * len(splits.train) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    splits = load_dataset(args.dataset, args.data_root)
    info = splits.info

    def fresh():
        torch.manual_seed(0)
        return ResNet18(info.num_classes, info.in_channels, args.width)

    # warm-up: one short pass of each so neither pays first-call costs
    warm = splits.train.subset(range(min(256, len(splits.train))))
    from papm.shared.datasets import DataSplits

    small = DataSplits(info, warm, splits.val, splits.test)
    plain_loop(fresh(), small, 1, args.batch_size, device)
    project_loop(fresh(), small, 1, args.batch_size, device)
    plain = plain_loop(fresh(), splits, args.epochs, args.batch_size, device)
    ours = project_loop(fresh(), splits, args.epochs, args.batch_size, device)
    row = {
        "dataset": args.dataset, "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
        "device": str(device), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "plain_img_per_s": round(plain, 1), "papm_img_per_s": round(ours, 1), "ratio": round(ours / plain, 3),
    }
    print(f"plain PyTorch loop: {plain:10.1f} img/s")
    print(f"papm training loop: {ours:10.1f} img/s")
    print(f"ratio (papm / plain): {ours / plain:.3f}")
    row["where"] = row["gpu"] or str(device)
    js, md = record(args.out, "bench_train", row, {
        "dataset": "dataset", "width": "width", "device": "where", "threads": "threads",
        "plain img/s": "plain_img_per_s", "papm img/s": "papm_img_per_s", "ratio": "ratio"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
