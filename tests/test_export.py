"""`papm export`: ONNX parts/head/base with PyTorch parity, INT8 parts close to fp32, a signed bundle.

The run directory is built by hand in the layout `papm simulate` writes (base.pt,
devices/device-k/pruned.pt, fusion/head.pt); test_edge.py reuses it through
:func:`exported_bundle` (memoised: built once per session).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from papm.shared.checkpoint import load_checkpoint, load_head, save_checkpoint, save_head
from papm.shared.datasets import normalise
from papm.shared.fusion import FusionHead, extract_features, feature_sums, fit_head, head_args
from papm.shared.prune_pipeline import specialise
from papm.shared.specialise import PruneSettings
from papm.shared.training import TrainSettings

GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
INT8_TOLERANCE = 0.03  # INT8 split accuracy may trail fp32 by at most 3 points (tiny model, digits test split)
PARITY_TOL = 1e-4

# `papm export` exactly as a user runs it
def run_export_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "papm.cli", "export", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


_CACHE: dict = {}


def build_run(tmp_path_factory, digits, base_ckpt):
    """A run directory as `papm simulate` lays it out: base, K=3 pruned devices, a fusion head."""
    if "run" in _CACHE:
        return _CACHE["run"]
    run = tmp_path_factory.mktemp("run")
    shutil.copy(base_ckpt, run / "base.pt")
    base, info, raw = load_checkpoint(run / "base.pt")
    settings = PruneSettings(budget=0.5, apoz_samples=256, finetune=TrainSettings(epochs=1, lr=0.02, warmup=0.1))
    extractors = []
    for k, classes in enumerate(GROUPS):
        model, margs, report = specialise(base, raw["model_args"], digits, classes, settings, "cpu", progress=False)
        save_checkpoint(run / "devices" / f"device-{k}" / "pruned.pt", model, margs, info, kind="pruned",
                        meta={"classes": classes, "reduction": report["reduction"]})
        extractors.append(load_checkpoint(run / "devices" / f"device-{k}" / "pruned.pt")[0])  # rebuilt: exact feature_dim
    x = normalise(digits.train.x, info)
    feats = torch.cat([extract_features(e, x) for e in extractors], dim=1)
    head = FusionHead([e.feature_dim for e in extractors], info.num_classes, hidden=32)
    head.set_normalisation(*feature_sums(feats))
    fit_head(head, feats, digits.train.y, epochs=15, lr=3e-3)
    save_head(run / "fusion" / "head.pt", head, head_args(head.feature_dims, info.num_classes, 32), info,
              meta={"devices": list(range(len(GROUPS)))})
    _CACHE["run"] = run
    return run


def exported_bundle(tmp_path_factory, digits, base_ckpt):
    """(run dir, signed INT8+fp32 bundle, key dir, CompletedProcess of the export)."""
    if "bundle" in _CACHE:
        return _CACHE["bundle"]
    from papm.deploy.bundle import generate_keypair

    run = build_run(tmp_path_factory, digits, base_ckpt)
    keys = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(keys)
    r = run_export_cli(run, "--int8", "--sign-key", priv, "--calib-samples", "128")
    assert r.returncode == 0, r.stderr
    _CACHE["bundle"] = (run, run / "bundle", keys, r)
    return _CACHE["bundle"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, digits, base_ckpt):
    return exported_bundle(tmp_path_factory, digits, base_ckpt)


def test_export_writes_a_complete_signed_bundle(exported):
    run, bundle, keys, r = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "papm-edge-bundle" and manifest["version"] == 1
    assert manifest["class_names"] == [str(c) for c in range(10)] and manifest["groups"] == GROUPS
    assert (bundle / "manifest.sig").is_file()
    for k, part in enumerate(manifest["parts"]):
        assert part["device"] == k and part["classes"] == GROUPS[k] and part["precisions"] == ["fp32", "int8"]
        assert part["input_shape"] == [None, 1, 8, 8] and len(part["mean"]) == 1 and part["feature_size"] > 0
        for entry in part["files"].values():
            assert (bundle / entry["file"]).is_file() and len(entry["sha256"]) == 64
    assert manifest["head"]["feature_size"] == sum(p["feature_size"] for p in manifest["parts"])
    assert set(manifest["base"]["files"]) == {"fp32", "int8"}
    assert not list(bundle.rglob("*.data")), "ONNX files must be self-contained"
    # printed parity per file and accuracy
    assert "parity" in r.stdout and "head.onnx" in r.stdout and "base.onnx" in r.stdout and "int8" in r.stdout
    parity = json.loads((bundle / "parity.json").read_text())
    files = {e["file"] for e in parity["files"]}
    assert files == {"parts/device-0.onnx", "parts/device-1.onnx", "parts/device-2.onnx", "head.onnx", "base.onnx"}
    assert all(e["ok"] and e["max_abs_diff"] <= PARITY_TOL for e in parity["files"])
    # no stray staging folders beside the bundle
    assert not [p for p in run.iterdir() if p.name.startswith(".bundle")]


def test_parity_of_every_exported_file_recomputed(exported, digits):
    """Independently of parity.json: PyTorch and ONNX Runtime agree within 1e-4 on test images."""
    import onnxruntime as ort

    run, bundle, _, _ = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    base, info, _ = load_checkpoint(run / "base.pt")
    head, _, _ = load_head(run / "fusion" / "head.pt")
    x = normalise(digits.test.x[:100], info)

    def ort_run(rel, inp):
        s = ort.InferenceSession(str(bundle / rel), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: inp.numpy()})[0]

    feats = []
    with torch.no_grad():
        for k, part in enumerate(manifest["parts"]):
            model, _, _ = load_checkpoint(run / "devices" / f"device-{k}" / "pruned.pt")
            ref = model.features(x)
            feats.append(ref)
            assert np.abs(ort_run(part["files"]["fp32"]["file"], x) - ref.numpy()).max() <= PARITY_TOL
        cat = torch.cat(feats, 1)
        assert np.abs(ort_run("head.onnx", cat) - head(cat).numpy()).max() <= PARITY_TOL
        assert np.abs(ort_run("base.onnx", x) - base(x).numpy()).max() <= PARITY_TOL
        # dynamic batch: batch 1 works too
        assert ort_run("base.onnx", x[:1]).shape == (1, 10)


def test_int8_split_accuracy_close_to_fp32(exported, digits):
    from papm.deploy.bundle import load_bundle
    from papm.deploy.runtime import EdgeRuntime

    _, bundle, _, r = exported
    acc = json.loads((bundle / "manifest.json").read_text())["accuracy"]
    assert acc["split"] == "test" and acc["samples"] == len(digits.test)
    assert acc["fp32"]["split"] == pytest.approx(acc["pytorch_split"], abs=1e-3)
    assert acc["int8"]["split"] >= acc["fp32"]["split"] - INT8_TOLERANCE, acc
    assert acc["int8"]["base"] >= acc["fp32"]["base"] - INT8_TOLERANCE, acc
    # recomputed through the runtime from the bundle
    b = load_bundle(bundle)
    info_mean = b.manifest["input"]["mean"]
    x = digits.test.x.numpy()
    y = digits.test.y.numpy()
    fp32 = EdgeRuntime(b, "fp32")
    int8 = EdgeRuntime(b, "int8")
    a32 = (fp32.logits(fp32.normalise(x)).argmax(1) == y).mean()
    a8 = (int8.logits(int8.normalise(x)).argmax(1) == y).mean()
    assert a32 == pytest.approx(acc["fp32"]["split"]) and a8 == pytest.approx(acc["int8"]["split"])
    assert a8 >= a32 - INT8_TOLERANCE and len(info_mean) == 1
    assert "int8: split" in r.stdout


def test_int8_parts_are_static_qdq_per_channel(exported):
    _, bundle, _, _ = exported
    model = onnx.load(str(bundle / "parts" / "device-0.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "DynamicQuantizeLinear" not in ops
    inits = {i.name: i for i in model.graph.initializer}
    # per-channel weights: some DequantizeLinear has a vector of scales
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
                   and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    assert per_channel
    assert model.opset_import[0].version >= 17


def _activation_zero_point_types(path) -> set:
    """The element types of the zero points of the QuantizeLinear nodes (the activations' INT8 type)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name
            for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


def test_int8_activation_type_is_honoured_and_both_agree_with_fp32(exported, tmp_path, digits):
    """u8 (the default: ONNX Runtime's x86 kernels favour unsigned activations) and s8 as asked; both
    within the INT8 tolerance of the fp32 split on the test split."""
    run, bundle, _, _ = exported
    assert _activation_zero_point_types(bundle / "parts" / "device-0.int8.onnx") == {"uint8"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert all(p["int8_settings"]["activations"] == "u8" for p in manifest["parts"])
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bundle"))
    r = run_export_cli(copy, "--int8", "--int8-activations", "s8", "--calib-samples", "128")
    assert r.returncode == 0, r.stderr
    signed = json.loads((copy / "bundle" / "manifest.json").read_text())
    assert _activation_zero_point_types(copy / "bundle" / "parts" / "device-0.int8.onnx") == {"int8"}
    assert _activation_zero_point_types(copy / "bundle" / "base.int8.onnx") == {"int8"}
    assert all(p["int8_settings"]["activations"] == "s8" for p in signed["parts"])
    for acc in (manifest["accuracy"], signed["accuracy"]):
        assert acc["int8"]["split"] >= acc["fp32"]["split"] - INT8_TOLERANCE


def test_export_refuses_to_overwrite_without_force(exported, tmp_path):
    run, bundle, _, _ = exported
    before = (bundle / "manifest.json").read_bytes()
    # the run's own bundle is regenerated on request, but a signed one only with a key: refused, unchanged
    line = one_error_line(run_export_cli(run))
    assert "is signed" in line and "--sign-key" in line
    # a wrong signing key is refused before any export work, nothing written
    fresh = tmp_path / "fresh"
    line = one_error_line(run_export_cli(run, "--out", fresh, "--sign-key", exported[2] / "papm-signing-key.pub.pem"))
    assert "is a public key" in line and "papm-signing-key.pem" in line and not fresh.exists()
    line = one_error_line(run_export_cli(run, "--out", fresh, "--sign-key", tmp_path / "nokey.pem"))
    assert "cannot read the signing (private) key" in line and not fresh.exists()
    assert (bundle / "manifest.json").read_bytes() == before
    # another existing bundle is replaced only with --force
    other = tmp_path / "copy"
    shutil.copytree(bundle, other)
    line = one_error_line(run_export_cli(run, "--out", other))
    assert "already exists" in line and "--force" in line
    assert (other / "manifest.json").read_bytes() == before
    # and a signed one, even with --force, only by a signed one (devices that verify would refuse an unsigned one)
    line = one_error_line(run_export_cli(run, "--out", other, "--force"))
    assert "is signed" in line and "--sign-key" in line and (other / "manifest.json").read_bytes() == before


def test_export_of_an_incomplete_run_dir(tmp_path, exported):
    run, _, _, _ = exported
    shutil.copy(run / "base.pt", tmp_path / "base.pt")
    line = one_error_line(run_export_cli(tmp_path))
    assert "fusion head not found" in line
    assert not (tmp_path / "bundle").exists()
