"""`papm export RUN_DIR`: the run's pruned extractors, fusion head and base model -> an edge bundle.

This module imports nothing heavy at import time, so cli.py can build its parser
without torch; :func:`run_export` imports torch (through the export library) when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_export_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("export", help="export a run's parts, fusion head and base model to a (signed) ONNX edge bundle")
    e.add_argument("run_dir", help="run directory (base.pt, devices/device-<k>/pruned.pt, fusion/head.pt)")
    e.add_argument("--out", default=None, help="bundle folder (default RUN_DIR/bundle)")
    e.add_argument("--int8", action="store_true", help="also write INT8 parts (static QDQ, calibrated on each device's training data)")
    e.add_argument("--calib-samples", type=int, default=256, help="INT8 calibration images per device (from its own classes)")
    e.add_argument("--sign-key", default=None, help="Ed25519 private key (PEM) to sign the manifest with")
    e.add_argument("--new-key", default=None, metavar="DIR",
                   help="generate an Ed25519 key pair in DIR and sign with it (keep the private key off the devices)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    return e


def run_export(args: argparse.Namespace) -> int:
    from ..shared.errors import PapmError
    from .assemble import export_run

    sign_key = args.sign_key
    if getattr(args, "new_key", None):
        if sign_key:
            raise PapmError("give either --sign-key or --new-key, not both")
        from .bundle import generate_keypair

        sign_key, pub = generate_keypair(args.new_key)
        print(f"new key pair: {sign_key} (private, keep it safe) and {pub} (give this to the devices)")
    result = export_run(args.run_dir, args.out, int8=args.int8, sign_key=sign_key, force=args.force,
                        calib_samples=args.calib_samples)
    print("parity (PyTorch vs ONNX Runtime, same inputs):")
    for r in result["parity"]:
        print(f"  {r['file']:<28} max |diff| {r['max_abs_diff']:.2e}  (<= {r['tolerance']:g}: {'ok' if r['ok'] else 'FAIL'})")
    acc = result["accuracy"]
    print(f"test accuracy ({acc['samples']} images): PyTorch split {acc['pytorch_split']:.4f}")
    for precision in ("fp32", "int8"):
        if precision in acc:
            a = acc[precision]
            delta = f"  (split {a['split'] - acc['fp32']['split']:+.4f} vs fp32)" if precision != "fp32" else ""
            print(f"  {precision}: split {a['split']:.4f}  base {a['base']:.4f}{delta}")
    bundle = Path(result["bundle"])
    print(f"bundle: {bundle} ({'signed' if sign_key else 'unsigned'}; parity report {bundle / 'parity.json'})")
    return 0
