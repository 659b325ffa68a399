"""`papm infer` / `papm bench` on an exported bundle: same predictions as PyTorch, torch-free,
and one clear error line for every damaged input."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from papm.shared.checkpoint import load_checkpoint, load_head
from papm.shared.datasets import normalise
from papm.shared.errors import PapmError
from papm.shared.fusion import SplitModel

from test_export import GROUPS, exported_bundle

N_IMAGES = 24

# The edge commands exactly as a user runs them: `papm infer|bench ...`.
def edge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "papm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def only_error_line(r) -> str:
    """Exit code 2 and exactly one line on stderr, `error: ...`."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, digits, base_ckpt):
    return exported_bundle(tmp_path_factory, digits, base_ckpt)


@pytest.fixture(scope="session")
def pngs(tmp_path_factory, digits):
    """The first test images as PNG files (8x8 grey: decoded without any resize) and their labels."""
    from PIL import Image

    d = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(N_IMAGES):
        p = d / f"img{i:02d}.png"
        Image.fromarray(digits.test.x[i, 0].numpy(), mode="L").save(p)
        paths.append(p)
    return d, paths


@pytest.fixture
def bundle_copy(tmp_path, exported):
    dst = tmp_path / "bundle"
    shutil.copytree(exported[1], dst)
    return dst


def torch_probs(run, digits, n):
    extractors = [load_checkpoint(run / "devices" / f"device-{k}" / "pruned.pt")[0] for k in range(len(GROUPS))]
    head, info, _ = load_head(run / "fusion" / "head.pt")
    with torch.no_grad():
        return torch.softmax(SplitModel(extractors, head).eval()(normalise(digits.test.x[:n], info)), 1).numpy()


def test_split_inference_matches_pytorch(exported, pngs, digits):
    run, bundle, keys, _ = exported
    folder, paths = pngs
    r = edge("infer", bundle, folder, "--json", "--top-k", "3", "--verify-key", keys / "papm-signing-key.pub.pem")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in paths]
    ref = torch_probs(run, digits, N_IMAGES)
    for row, p in zip(rows, ref):
        assert len(row["top_k"]) == 3
        assert row["top_k"][0]["index"] == int(p.argmax())
        assert row["top_k"][0]["class"] == str(int(p.argmax()))
        for t in row["top_k"]:
            assert t["prob"] == pytest.approx(float(p[t["index"]]), abs=1e-4)
    assert "warning" not in r.stderr  # verified with a key: nothing to warn about
    # plain text output for two files
    r = edge("infer", bundle, paths[0], paths[1], "--top-k", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(f"{paths[0]}: {int(ref[0].argmax())} ")
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "checksums only" in warnings[0]


def test_part_then_fuse_equals_whole_split(exported, pngs, tmp_path):
    _, bundle, _, _ = exported
    folder, _ = pngs
    files = []
    for k in range(len(GROUPS)):
        f = tmp_path / f"f{k}"  # no .npy suffix: the name is kept as given
        r = edge("infer", bundle, "--part", k, folder, "--out", f)
        assert r.returncode == 0, r.stderr
        a = np.load(f)
        assert a.shape[0] == N_IMAGES and a.dtype == np.float32
        files.append(f)
    whole = [json.loads(l) for l in edge("infer", bundle, folder, "--json").stdout.splitlines()]
    fused = [json.loads(l) for l in edge("infer", bundle, "--fuse", *files, "--json").stdout.splitlines()]
    assert len(fused) == len(whole) == N_IMAGES
    for w, f in zip(whole, fused):
        assert [t["index"] for t in w["top_k"]] == [t["index"] for t in f["top_k"]]
        assert [t["prob"] for t in w["top_k"]] == pytest.approx([t["prob"] for t in f["top_k"]], abs=1e-6)
    assert [f["image"] for f in fused] == [w["image"] for w in whole]  # each row named by its image
    # a device that computed its part on the images in another order: refused, not fused row by wrong row
    images = sorted(Path(folder).iterdir())
    assert edge("infer", bundle, "--part", 1, *images[::-1], "--out", files[1]).returncode == 2  # its files are kept
    assert edge("infer", bundle, "--part", 1, *images[::-1], "--out", files[1], "--force").returncode == 0
    r = edge("infer", bundle, "--fuse", *files)
    assert r.returncode == 2 and f"were computed on other images (row 0: {images[0].name} / {images[-1].name})" in r.stderr
    (tmp_path / "f1.images.json").unlink()  # feature files without their image lists: rows by number
    rows = [json.loads(l) for l in edge("infer", bundle, "--fuse", *files, "--json").stdout.splitlines()]
    assert [r["row"] for r in rows] == list(range(N_IMAGES))


def test_int8_inference_agrees_with_fp32(exported, pngs):
    """INT8 parts give (nearly) the fp32 predictions, with valid probabilities over all classes."""
    _, bundle, _, _ = exported
    folder, paths = pngs
    probs = {}
    for precision in ("fp32", "int8"):
        r = edge("infer", bundle, folder, "--precision", precision, "--json", "--top-k", "10", "--threads", "1")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(l) for l in r.stdout.splitlines()]
        assert [row["image"] for row in rows] == [str(p) for p in paths]
        p = np.zeros((len(rows), 10))
        for i, row in enumerate(rows):
            assert sorted(t["index"] for t in row["top_k"]) == list(range(10))  # every class, once
            for t in row["top_k"]:
                p[i, t["index"]] = t["prob"]
        probs[precision] = p
    for p in probs.values():
        assert ((p >= 0) & (p <= 1)).all()
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    agree = (probs["int8"].argmax(1) == probs["fp32"].argmax(1)).mean()
    assert agree >= 0.9, agree
    # and the INT8 parts really ran: the probabilities are close to fp32 but not the same numbers
    assert np.abs(probs["int8"] - probs["fp32"]).max() > 0
    assert np.abs(probs["int8"] - probs["fp32"]).mean() < 0.05


BLOCKED_MAIN = """
import importlib.abc, sys
BLOCK = {"torch", "torchvision", "flwr", "sklearn"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Block())
from papm.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCK)
assert not loaded, loaded
sys.exit(code)
"""


def test_infer_and_bench_need_no_torch(exported, pngs, tmp_path):
    _, bundle, keys, _ = exported
    folder, paths = pngs
    pub = keys / "papm-signing-key.pub.pem"
    run = lambda *a: subprocess.run([sys.executable, "-c", BLOCKED_MAIN, *map(str, a)], capture_output=True, text=True)  # noqa: E731
    r = run("infer", bundle, folder, "--verify-key", pub, "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == N_IMAGES
    r = run("infer", bundle, "--part", 0, paths[0], "--out", tmp_path / "f0.npy", "--precision", "int8")
    assert r.returncode == 0, r.stderr
    r = run("bench", bundle, "--runs", 2, "--warmup", 0, "--batch", 4, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    # the blocker really blocks
    r = subprocess.run([sys.executable, "-c", BLOCKED_MAIN.replace("from papm.cli import main", "import torch")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


def test_bench_writes_csv_and_markdown(exported, digits, tmp_path):
    from PIL import Image

    _, bundle, _, _ = exported
    for i in range(40):  # an ImageFolder-style test tree named by class
        c = int(digits.test.y[i])
        (tmp_path / "test" / str(c)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.test.x[i, 0].numpy(), mode="L").save(tmp_path / "test" / str(c) / f"{i}.png")
    out = tmp_path / "bench"
    r = edge("bench", bundle, "--test-dir", tmp_path, "--runs", 3, "--warmup", 1, "--batch", 8, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((out / "bench.csv").open()))
    models = {(row["model"], row["precision"]) for row in rows}
    for precision in ("fp32", "int8"):
        assert ("base (unsplit)", precision) in models
        assert ("split: slowest part + head", precision) in models and ("split: all parts in turn + head (measured)", precision) in models
        for k in range(len(GROUPS)):
            assert (f"part {k} (device {k})", precision) in models
    assert ("head", "fp32") in models
    for row in rows:
        assert float(row["lat1_ms"]) > 0 and float(row["latn_p95_ms"]) > 0 and float(row["throughput"]) > 0
        assert int(row["params"]) > 0 and float(row["size_kb"]) > 0
        assert 0 < int(row["nonzero_params"]) <= int(row["params"]) and 0.0 <= float(row["sparsity"]) < 1.0
        if row["model"].startswith("part"):  # a pruned part is a fraction of the base model
            assert 0.0 < float(row["vs_base"]) < 1.0
        if row["model"].startswith(("split", "base")):
            assert 0.0 <= float(row["accuracy"]) <= 1.0
    head = [r_ for r_ in rows if r_["model"] == "head"]
    assert all(h == head[0] for h in head)  # the one fp32 head, listed with each precision
    for precision in ("fp32", "int8"):
        parts = [r_ for r_ in rows if r_["model"].startswith("part") and r_["precision"] == precision]
        par = next(r_ for r_ in rows if r_["model"].startswith("split: slowest") and r_["precision"] == precision)
        seq = next(r_ for r_ in rows if r_["model"].startswith("split: all") and r_["precision"] == precision)
        # devices run in parallel: the split's latency is the slowest part's plus the head's, per column
        for key in ("lat1_ms", "lat1_p95_ms", "latn_ms", "latn_p95_ms"):
            assert float(par[key]) == pytest.approx(max(float(p[key]) for p in parts) + float(head[0][key]), rel=1e-9), key
        # and its throughput is that of its slowest stage
        assert float(par["throughput"]) == pytest.approx(min(float(x["throughput"]) for x in parts + head[:1]), rel=1e-9)
        # both split rows describe the same models: every part and the head
        for split in (par, seq):
            assert int(split["params"]) == sum(int(p["params"]) for p in parts) + int(head[0]["params"])
            assert int(split["nonzero_params"]) == sum(int(p["nonzero_params"]) for p in parts) + int(head[0]["nonzero_params"])
            assert float(split["size_kb"]) == pytest.approx(sum(float(p["size_kb"]) for p in parts) + float(head[0]["size_kb"]), abs=0.051)
            assert split["accuracy"] == par["accuracy"]
    assert "| model |" in (out / "bench.md").read_text() and "split: slowest part + head" in r.stdout
    # without --test-dir the table shows the accuracy the export measured on the test split
    r = edge("bench", bundle, "--runs", 2, "--warmup", 1, "--batch", 4, "--out", tmp_path / "bench2")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    split = next(r_ for r_ in csv.DictReader((tmp_path / "bench2" / "bench.csv").open())
                 if r_["model"].startswith("split: slowest") and r_["precision"] == "fp32")
    assert float(split["accuracy"]) == pytest.approx(manifest["accuracy"]["fp32"]["split"])


def test_bench_test_data_from_npz(exported, digits, tmp_path):
    from papm.deploy.bundle import load_bundle
    from papm.deploy.edge_bench import load_test_data
    from papm.deploy.runtime import EdgeRuntime

    _, bundle, _, _ = exported
    np.savez(tmp_path / "t.npz", x=digits.test.x[:10].numpy(), y=digits.test.y[:10].numpy())
    x, y = load_test_data(tmp_path / "t.npz", EdgeRuntime(load_bundle(bundle), "fp32"))
    assert x.shape == (10, 1, 8, 8) and x.dtype == np.uint8 and list(y) == digits.test.y[:10].tolist()
    from PIL import Image  # a class tree copied from a Mac, opened in Jupyter: its hidden files are not test images

    for i in range(6):
        d = tmp_path / "tree" / str(int(digits.test.y[i]))
        (d / ".ipynb_checkpoints").mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.test.x[i, 0].numpy(), mode="L").save(d / f"{i}.png")
        (d / f"._{i}.png").write_bytes(b"AppleDouble")
        (d / ".ipynb_checkpoints" / f"{i}-checkpoint.png").write_bytes(b"not an image")
    (tmp_path / "tree" / ".ipynb_checkpoints").mkdir()
    x, y = load_test_data(tmp_path / "tree", EdgeRuntime(load_bundle(bundle), "fp32"))
    assert sorted(y.tolist()) == sorted(int(c) for c in digits.test.y[:6]) and x.shape == (6, 1, 8, 8)
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 1, 9, 9), np.uint8), y=np.zeros(3))
    r = edge("bench", bundle, "--test-dir", tmp_path / "bad.npz", "--runs", 1, "--verify-key", exported[2] / "papm-signing-key.pub.pem")
    assert "bad.npz" in only_error_line(r)


# ---- one clear error line each ----------------------------------------------------------------

def test_tampered_file(bundle_copy, pngs):
    with (bundle_copy / "parts" / "device-1.onnx").open("r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0]))
    assert "device-1.onnx" in line and "sha256" in line


def test_file_swapped_after_the_check_is_never_run(bundle_copy, monkeypatch):
    """Verify, then run the very bytes verified: a part replaced by another valid ONNX file after the
    bundle was checked is refused when its session is made, and ONNX Runtime never sees its bytes."""
    from papm.deploy import runtime
    from papm.deploy.bundle import load_bundle

    bundle = load_bundle(bundle_copy)
    part = bundle_copy / "parts" / "device-0.onnx"
    shutil.copy(bundle_copy / "parts" / "device-1.onnx", part)  # a valid graph, the wrong one
    given = []
    real = runtime.make_session
    monkeypatch.setattr(runtime, "make_session", lambda model, *a, **k: given.append(model) or real(model, *a, **k))
    rt = runtime.EdgeRuntime(bundle)
    x = np.zeros((1, 1, 8, 8), np.float32)
    rt.part_features(1, x)  # an untouched part runs, from the bytes that were checked
    assert given and isinstance(given[0], bytes)
    with pytest.raises(PapmError, match="changed since the bundle was checked"):
        rt.part_features(0, x)
    assert len(given) == 1  # the swapped file never reached ONNX Runtime


def test_missing_file(bundle_copy, pngs):
    (bundle_copy / "head.onnx").unlink()
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0]))
    assert "missing" in line and "head.onnx" in line


def test_entry_without_checksum_is_refused(bundle_copy, pngs):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["parts"][0]["files"]["fp32"]["sha256"]  # a hand-edited manifest must not make a file trusted
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0]))
    assert "without a sha256" in line and "device-0.onnx" in line


def test_wrong_manifest_version(bundle_copy, pngs):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0]))
    assert "version 99" in line and "re-export" in line


def test_manifest_edited_after_signing(bundle_copy, pngs, exported):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["class_names"][0] = "zero"
    (bundle_copy / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0], "--verify-key", exported[2] / "papm-signing-key.pub.pem"))
    assert "does not match its signature" in line


def test_signature_from_another_key(bundle_copy, pngs, tmp_path):
    from papm.deploy.bundle import generate_keypair

    other_priv, other_pub = generate_keypair(tmp_path / "other")
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0], "--verify-key", other_pub))
    assert "signature" in line
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0], "--verify-key", other_priv))  # the pair's files swapped
    assert "is the private (signing) key" in line and "papm-signing-key.pub.pem" in line


def test_unsigned_bundle_with_verify_key(bundle_copy, pngs, exported):
    (bundle_copy / "manifest.sig").unlink()
    pub = exported[2] / "papm-signing-key.pub.pem"
    line = only_error_line(edge("infer", bundle_copy, pngs[1][0], "--verify-key", pub))
    assert "not signed" in line and "--sign-key" in line
    # without a key it still runs, on checksums, and says so
    r = edge("infer", bundle_copy, pngs[1][0])
    assert r.returncode == 0 and r.stderr.count("warning:") == 1


def test_unreadable_image(exported, tmp_path, pngs):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    pub = exported[2] / "papm-signing-key.pub.pem"
    line = only_error_line(edge("infer", exported[1], pngs[1][0], bad, "--verify-key", pub))
    assert "broken.png" in line
    # a folder with bad files among good ones: the good ones are predicted (as alone, in order), the bad ones named once
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in pngs[1][:5]:
        shutil.copy(p, folder / p.name)
    (folder / "img01b.png").write_bytes(b"truncated")
    (folder / "zz.jpg").write_bytes(b"")
    r = edge("infer", exported[1], folder, "--json", "--batch-size", "2", "--verify-key", pub)
    line = only_error_line(r)
    assert "predicted 5 of 7 images" in line and "img01b.png" in line and "zz.jpg" in line, line
    alone = [json.loads(l) for l in edge("infer", exported[1], *pngs[1][:5], "--json", "--verify-key", pub).stdout.splitlines()]
    mixed = [json.loads(l) for l in r.stdout.splitlines()]
    assert [Path(m["image"]).name for m in mixed] == [p.name for p in pngs[1][:5]]
    assert [m["top_k"] for m in mixed] == [a["top_k"] for a in alone]
    # --part writes rows that must line up across devices: any unreadable file refuses the whole file, all named
    line = only_error_line(edge("infer", exported[1], "--part", 0, folder, "--out", tmp_path / "f.npy", "--verify-key", pub))
    assert "cannot read 2 of 7 images" in line and "img01b.png" in line and "zz.jpg" in line, line
    assert not (tmp_path / "f.npy").exists()
    line = only_error_line(edge("infer", exported[1], tmp_path / "nope.png", "--verify-key", pub))
    assert "nope.png" in line and "not found" in line


def test_feature_file_of_wrong_size(exported, pngs, tmp_path):
    _, bundle, keys, _ = exported
    pub = keys / "papm-signing-key.pub.pem"
    m = json.loads((bundle / "manifest.json").read_text())
    files = []
    for k, part in enumerate(m["parts"]):
        d = part["feature_size"] + (3 if k == 1 else 0)
        np.save(tmp_path / f"f{k}.npy", np.zeros((2, d), np.float32))
        files.append(tmp_path / f"f{k}.npy")
    line = only_error_line(edge("infer", bundle, "--fuse", *files, "--verify-key", pub))
    assert "f1.npy" in line and str(m["parts"][1]["feature_size"]) in line
    line = only_error_line(edge("infer", bundle, "--fuse", *files[:2], "--verify-key", pub))
    assert "needs 3 feature files" in line
    line = only_error_line(edge("infer", bundle, "--fuse", files[0], pngs[1][0], files[2], "--verify-key", pub))
    assert "is an image, not a feature file" in line and "without --fuse" in line
    line = only_error_line(edge("bench", bundle, "--test-dir", files[0], "--runs", 1, "--verify-key", pub))
    assert "neither an .npz nor a folder" in line
    line = only_error_line(edge("infer", bundle, "--part", 7, pngs[1][0], "--out", tmp_path / "x.npy", "--verify-key", pub))
    assert "--part 7" in line
