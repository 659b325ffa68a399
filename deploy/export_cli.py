"""`papm export RUN_DIR`: the run's pruned extractors, fusion head and base model -> an edge bundle.

This module imports nothing heavy at import time, so cli.py can build its parser
without torch; :func:`run_export` imports torch (through the export library) when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_export_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("export", help="export a run's parts, fusion head and base model, or one checkpoint, to a (signed) "
                                      "ONNX edge bundle")
    e.add_argument("run_dir", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directory (base.pt, devices/device-<k>/pruned.pt, fusion/head.pt), or a checkpoint of "
                        "`papm prune` / `papm train` (a one-part bundle: its extractor and its own classifier)")
    e.add_argument("--out", default=None, help="bundle folder (default RUN_DIR/bundle, or <checkpoint name>-bundle beside it)")
    e.add_argument("--base", default=None, help="with a checkpoint: the base model to add for comparison (default: the one "
                   "`papm prune` recorded, when it is still there)")
    e.add_argument("--int8", action="store_true", help="also write INT8 parts (static QDQ, calibrated on training images of each "
                   "part's classes)")
    e.add_argument("--calib-samples", type=int, default=256, help="INT8 calibration images per part (of its own classes)")
    e.add_argument("--int8-activations", choices=("u8", "s8"), default="u8",
                   help="INT8 activation type for the files made here: u8 (default; fastest with ONNX Runtime on x86) or s8")
    e.add_argument("--int8-reduce-range", choices=("auto", "on", "off"), default="auto",
                   help="7-bit weights for u8 activations: auto (this machine lacks VNNI), on (the edge devices are "
                        "x86 without VNNI), off")
    e.add_argument("--sign-key", default=None, help="Ed25519 private key (PEM) to sign the manifest with")
    e.add_argument("--new-key", default=None, metavar="DIR",
                   help="generate an Ed25519 key pair in DIR and sign with it (keep the private key off the devices)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.add_argument("--data-root", default=None, help="where the base's training data is now (default: the folder it was "
                   "trained on, as its checkpoint names it); read for parity inputs, test accuracy and INT8 calibration")
    return e


def run_export(args: argparse.Namespace) -> int:
    from ..shared.errors import PapmError
    from ..shared.files import check_writable
    from .assemble import export_run
    from .export_model import export_checkpoint

    one_model = Path(args.run_dir).is_file()
    if args.base is not None and not one_model:
        raise PapmError("--base goes with a checkpoint (papm export pruned.pt --base base.pt); a run directory has its "
                        "own base.pt")

    def export(sign_key):
        if one_model:
            return export_checkpoint(args.run_dir, args.out, base=args.base, sign_key=sign_key, **options)
        return export_run(args.run_dir, args.out, sign_key=sign_key, **options)

    if args.out is not None:
        check_writable(args.out, "--out", folder=True)
    if getattr(args, "new_key", None) is not None:
        check_writable(args.new_key, "--new-key", folder=True)
    sign_key = args.sign_key
    options = dict(int8=args.int8, force=args.force, calib_samples=args.calib_samples, data_root=args.data_root,
                   int8_activations=args.int8_activations,
                   int8_reduce_range={"auto": None, "on": True, "off": False}[args.int8_reduce_range])
    if not getattr(args, "new_key", None):
        if sign_key:  # a missing or wrong key is one line now, not after the export and INT8 work
            from .bundle import check_signing_key

            check_signing_key(sign_key)
        result = export(sign_key)
    else:
        if sign_key:
            raise PapmError("give either --sign-key or --new-key, not both")
        import shutil

        from ..shared.files import new_temp_dir
        from .bundle import PRIVATE_KEY, PUBLIC_KEY, generate_keypair
        from .bundle_write import bundle_folder

        keys = Path(args.new_key)
        out = bundle_folder(args.run_dir, args.out).resolve()
        if keys.resolve() == out or out in keys.resolve().parents:  # the private key must never ship with the bundle
            raise PapmError(f"--new-key {keys} is inside the bundle folder {out}; keep the keys in a folder of their own, "
                            "e.g. --new-key keys/")
        for name in (PRIVATE_KEY, PUBLIC_KEY):
            if (keys / name).exists():
                raise PapmError(f"{keys / name} already exists; sign with --sign-key {keys / PRIVATE_KEY}, or give --new-key another folder")
        # the pair is made beside its folder and moved in only once the signed bundle exists:
        # a failed export leaves no key behind, and a retry is not stuck on one
        made = [d for d in (keys, *keys.parents) if not d.exists()]  # folders this command creates (removed on failure)
        keys.mkdir(parents=True, exist_ok=True)
        staging = new_temp_dir(keys, "new-key")
        signed = False
        try:
            staged_priv, staged_pub = generate_keypair(staging)
            result = export(staged_priv)
            signed = True  # from here on the pair signs a bundle: it is moved into place, never deleted
            for path in (staged_priv, staged_pub):
                path.rename(keys / path.name)
        finally:
            if not signed:
                shutil.rmtree(staging, ignore_errors=True)
                for d in made:  # deepest first; only what this command made, and only if still empty
                    if d.is_dir() and not any(d.iterdir()):
                        d.rmdir()
            elif not any(staging.iterdir()):
                staging.rmdir()
        sign_key = keys / PRIVATE_KEY
        print(f"new key pair: {sign_key} (private, keep it safe) and {keys / PUBLIC_KEY} (give this to the devices)")
    print("parity (PyTorch vs ONNX Runtime, same inputs):")
    for r in result["parity"]:
        print(f"  {r['file']:<28} max |diff| {r['max_abs_diff']:.2e}  (<= {r['tolerance']:g}: {'ok' if r['ok'] else 'FAIL'})")
    acc = result["accuracy"]
    what = "model" if one_model else "split"
    if acc["samples"]:
        print(f"test accuracy ({acc['samples']} images): PyTorch {what} {acc['pytorch_split']:.4f}")
    for precision in ("fp32", "int8"):
        if precision in acc:
            a = acc[precision]
            delta = f"  ({what} {a['split'] - acc['fp32']['split']:+.4f} vs fp32)" if precision != "fp32" else ""
            own = f" (on its classes {a['on_classes']:.4f})" if "on_classes" in a else ""
            base = f"  base {a['base']:.4f}" if "base" in a else ""
            print(f"  {precision}: {what} {a['split']:.4f}{own}{base}{delta}")
    bundle = Path(result["bundle"])
    print(f"bundle: {bundle} ({'signed' if sign_key else 'unsigned'}; parity report {bundle / 'parity.json'})")
    return 0
