"""Reading an ImageFolder tree at scale: JPEG decoding on one process against one per CPU, and a
second read from the decoded-image cache.

    python3 ../shared/data/unpack_cifar10.py data/cifar10
    python benchmarks/bench_data.py --data-root data/cifar10 [--split train] [--image-size 32]

Each figure is one timed read of the whole split (the cache is a fresh temporary folder, so
the first parallel read decodes and the last one reads the cache). Writes
benchmarks/bench_data.json and adds a row to benchmarks/bench_data.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_record import record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="bench-data-cache-")
    os.environ["PAPM_CACHE_DIR"] = cache
    from papm.shared import image_cache
    from papm.shared.images import class_folders
    from papm.shared.images import load_images

    folder = Path(args.data_root) / args.split
    classes = class_folders(folder)
    files = [f for f, _ in image_cache.list_images(folder, classes)]
    try:
        t0 = time.perf_counter()
        load_images(files, args.channels, args.image_size, workers=1)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        image_cache.read_image_folder(folder, classes, args.channels, args.image_size)  # decodes, fills the cache
        parallel = time.perf_counter() - t0
        t0 = time.perf_counter()
        image_cache.read_image_folder(folder, classes, args.channels, args.image_size)
        cached = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    row = {"images": len(files), "split": str(folder), "size": args.image_size, "cpus": os.cpu_count(),
           "serial_s": round(serial, 2), "parallel_s": round(parallel, 2), "cached_s": round(cached, 2),
           "serial_img_per_s": round(len(files) / serial), "parallel_img_per_s": round(len(files) / parallel),
           "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_data.py " + " ".join(argv or [])}
    print(f"{len(files)} images from {folder} at {args.image_size}x{args.image_size}:")
    print(f"  decode, 1 process:            {serial:7.2f} s  ({row['serial_img_per_s']} img/s)")
    print(f"  decode, {os.cpu_count()} processes (+ cache): {parallel:7.2f} s  ({row['parallel_img_per_s']} img/s)")
    print(f"  second read, from the cache:  {cached:7.2f} s")
    js, md = record(args.out, "bench_data", row, {"date": "date", "images": "images", "cpus": "cpus", "1 process s": "serial_s",
                                                   "all CPUs s": "parallel_s", "cached s": "cached_s"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
