"""`papm export pruned.pt`: one checkpoint (of `papm prune` or `papm train`) -> a one-part edge bundle that
`papm infer` and `papm bench` run without PyTorch, with the same predictions as the PyTorch model."""

import json
import shutil

import numpy as np
import pytest
import torch

from papm.deploy.bundle import load_bundle
from papm.deploy.runtime import EdgeRuntime
from papm.shared.checkpoint import load_checkpoint
from papm.shared.datasets import normalise

from conftest import run_papm, write_pattern_folder, TINY_WIDTH

CLASSES = [3, 5, 8]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, base_ckpt):
    """`papm prune base.pt ... --out p.pt` run in a folder of its own (it records the base as typed: base.pt)."""
    d = tmp_path_factory.mktemp("one-model")
    shutil.copy(base_ckpt, d / "base.pt")
    r = run_papm("prune", "base.pt", "--classes", ",".join(map(str, CLASSES)), "--budget", "0.6", "--finetune-epochs", "1",
                 "--out", "p.pt", "--quiet", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def bundle(pruned, tmp_path_factory):
    """Exported from another folder than the prune ran in: the recorded base is found beside the checkpoint."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    r = run_papm("export", pruned / "p.pt", "--int8", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "model" in r.stdout and "on its classes" in r.stdout
    assert f"base: {pruned / 'base.pt'} (the file it was pruned from: SHA-256 checked)" in r.stdout
    return pruned / "p-bundle"


def pngs(folder, digits, n=12):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray(digits.test.x[i, 0].numpy(), mode="L").save(folder / f"img{i:02d}.png")
    return folder


def export_here(*args, cwd, capsys, monkeypatch) -> str:
    """`papm export ARGS` in this process (faster than a subprocess: torch is loaded), from ``cwd``; returns stdout."""
    from papm.cli import main

    monkeypatch.chdir(cwd)
    code = main(["export", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_pruned_checkpoint_becomes_a_one_part_bundle_with_its_base(bundle, pruned, digits):
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["groups"] == [CLASSES] and len(m["parts"]) == 1 and m["parts"][0]["precisions"] == ["fp32", "int8"]
    assert m["source"] == {"checkpoint": "p.pt", "kind": "pruned", "base_checkpoint": "base.pt"}
    model, info, _ = load_checkpoint(pruned / "p.pt")
    base, _, _ = load_checkpoint(pruned / "base.pt")
    assert m["parts"][0]["params"] + m["head"]["params"] == sum(p.numel() for p in model.parameters())
    assert m["base"]["params"] == sum(p.numel() for p in base.parameters())
    x = normalise(digits.test.x, info)
    with torch.no_grad():
        want, want_base = model(x).numpy(), base(x).numpy()
    rt = EdgeRuntime(load_bundle(bundle, quiet=True), "fp32")
    np.testing.assert_allclose(rt.logits(x.numpy()), want, atol=1e-4 * max(1.0, np.abs(want).max()))
    np.testing.assert_allclose(rt.base_logits(x.numpy()), want_base, atol=1e-4 * max(1.0, np.abs(want_base).max()))
    # the accuracy in the manifest is the model's, on all classes and on its own
    y = digits.test.y.numpy()
    own = np.isin(y, CLASSES)
    assert m["accuracy"]["fp32"]["split"] == pytest.approx(float((want.argmax(1) == y).mean()))
    assert m["accuracy"]["fp32"]["on_classes"] == pytest.approx(float((want.argmax(1) == y)[own].mean()))
    assert m["accuracy"]["fp32"]["base"] == pytest.approx(float((want_base.argmax(1) == y).mean()))
    int8 = EdgeRuntime(load_bundle(bundle, quiet=True), "int8").logits(x.numpy()).argmax(1)
    assert (int8 == want.argmax(1)).mean() >= 0.9


def test_infer_and_bench_run_the_one_model_bundle(bundle, pruned, digits, tmp_path):
    images = pngs(tmp_path / "imgs", digits)
    r = run_papm("infer", bundle, images, "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    model, info, _ = load_checkpoint(pruned / "p.pt")
    with torch.no_grad():
        want = model(normalise(digits.test.x[:12], info)).argmax(1).tolist()
    assert [row["top_k"][0]["class"] for row in rows] == [str(c) for c in want]
    r = run_papm("bench", bundle, "--runs", "5", "--warmup", "1", "--batch", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = (bundle / "bench.md").read_text()
    for row in ("| base (unsplit) | fp32", "| part 0 (device 0) | int8", "| model: part + head (measured) | int8"):
        assert row in table
    assert "split:" not in table  # one model: nothing runs in parallel


def test_checkpoint_without_a_base_exports_without_base_rows(base_ckpt, digits, tmp_path):
    """A `papm train` checkpoint (no base recorded) and a pruned one whose base is gone: no base in the bundle."""
    shutil.copy(base_ckpt, tmp_path / "base.pt")
    r = run_papm("export", "base.pt", "--out", "b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no base model in the bundle" in r.stdout
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "base" not in m and m["groups"] == [list(range(10))] and "on_classes" not in m["accuracy"]["fp32"]
    model, info, _ = load_checkpoint(tmp_path / "base.pt")
    with torch.no_grad():
        want = model(normalise(digits.test.x, info)).numpy()
    got = EdgeRuntime(load_bundle(tmp_path / "b", quiet=True), "fp32").logits(normalise(digits.test.x, info).numpy())
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))
    r = run_papm("bench", tmp_path / "b", "--runs", "3", "--warmup", "1", "--batch", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "base (unsplit)" not in (tmp_path / "b" / "bench.md").read_text()


def test_base_option_names_the_base(pruned, tmp_path, capsys, monkeypatch):
    """--base adds the file given; one that is not the file it was pruned from is still compared, with a note."""
    from papm.shared.checkpoint import save_checkpoint
    from papm.shared.models import build_model

    shutil.copy(pruned / "base.pt", tmp_path / "moved-base.pt")
    stdout = export_here(pruned / "p.pt", "--base", "moved-base.pt", "--out", "with-base",
                         cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert json.loads((tmp_path / "with-base" / "manifest.json").read_text())["source"]["base_checkpoint"] == "moved-base.pt"
    assert "note:" not in stdout
    _, info, raw = load_checkpoint(pruned / "base.pt")
    save_checkpoint(tmp_path / "other-base.pt", build_model(raw["model_args"]), raw["model_args"], info, kind="base")
    stdout = export_here(pruned / "p.pt", "--base", "other-base.pt", "--out", "other",
                         cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert "note: --base other-base.pt is not the file this model was pruned from" in stdout
    assert json.loads((tmp_path / "other" / "manifest.json").read_text())["base"]["params"] > 0


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_bad_inputs_of_a_checkpoint_export(pruned, bundle, tmp_path, capsys, monkeypatch):
    from papm.cli import main
    from papm.shared.checkpoint import save_checkpoint
    from papm.shared.datasets import DatasetInfo
    from papm.shared.models import build_model

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    _, info, raw = load_checkpoint(pruned / "base.pt")  # a base of another image size is not this model's base
    save_checkpoint(tmp_path / "other.pt", build_model(raw["model_args"]), raw["model_args"],
                    DatasetInfo.from_dict(info.to_dict() | {"image_size": 16}), kind="base")
    monkeypatch.chdir(pruned)
    cases = [
        (["p.pt", "--base", "missing.pt", "--out", str(tmp_path / "x")], "--base missing.pt is not found"),
        (["p.pt", "--out", str(tmp_path / "notes")], "is not a PAPM edge bundle"),
        (["p.pt", "--out", str(bundle)], "already exists; pass --force"),
        (["p.pt", "--out", "."], "is inside --out"),
        ([str(pruned), "--base", "base.pt"], "--base goes with a checkpoint"),
        (["pruned-typo.pt"], "run directory or checkpoint not found: pruned-typo.pt"),
        (["p.pt", "--base", str(tmp_path), "--out", str(tmp_path / "x")], "is a folder"),
        (["p.pt", "--base", "p.pt", "--out", str(tmp_path / "x")], "is a pruned checkpoint, not a base model"),
        (["p.json"], "p.json is not a readable checkpoint"),
        (["p.pt", "--data-root", str(tmp_path), "--out", str(tmp_path / "x")], "the data is digits (shipped with scikit-learn)"),  # named before its default --out (p-bundle) is looked at
        (["p.pt", "--base", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")], "give --base the model it was pruned from"),
    ]
    for args, expected in cases:
        assert main(["export", *args]) == 2, args
        line = capsys.readouterr().err.strip()
        assert line.startswith("error: ") and "\n" not in line and expected in line, (args, line)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists() and not (tmp_path / "o").exists()
    # as a user runs it: one line, exit 2
    assert "--base goes with a checkpoint" in one_error_line(run_papm("export", pruned, "--base", "base.pt"))


def test_only_the_recorded_base_is_taken(pruned, tmp_path, capsys, monkeypatch):
    """With the base gone from where papm prune read it, a file of its name where the export runs or beside the
    checkpoint is added only if it is the base checkpoint papm prune read (kind and SHA-256); otherwise the bundle
    has no base and the export says why."""
    from papm.shared.checkpoint import save_checkpoint
    from papm.shared.models import build_model

    work, folder = tmp_path / "work", tmp_path / "moved"
    work.mkdir()
    folder.mkdir()
    shutil.copy(pruned / "p.pt", work / "base.pt")  # a pruned model named base.pt in the folder the export runs in
    shutil.copy(pruned / "p.pt", folder / "p.pt")
    _, info, raw = load_checkpoint(pruned / "base.pt")
    shutil.move(pruned / "base.pt", tmp_path / "away.pt")  # the recorded path no longer holds it
    try:
        stdout = export_here(folder / "p.pt", "--out", tmp_path / "b1", cwd=work, capsys=capsys, monkeypatch=monkeypatch)
        assert "base" not in json.loads((tmp_path / "b1" / "manifest.json").read_text())
        assert "no base model in the bundle" in stdout and "is a pruned checkpoint, not a base model" in stdout
        torch.manual_seed(1)  # another base checkpoint of that name beside it: not the one it was pruned from
        save_checkpoint(folder / "base.pt", build_model(raw["model_args"]), raw["model_args"], info, kind="base")
        stdout = export_here(folder / "p.pt", "--out", tmp_path / "b2", cwd=work, capsys=capsys, monkeypatch=monkeypatch)
        assert "base" not in json.loads((tmp_path / "b2" / "manifest.json").read_text())
        assert "is not the base it was pruned from" in stdout
        shutil.copy(tmp_path / "away.pt", folder / "base.pt")  # the right one, moved along with the model: found
        stdout = export_here(folder / "p.pt", "--out", tmp_path / "b3", cwd=work, capsys=capsys, monkeypatch=monkeypatch)
        assert f"base: {folder / 'base.pt'}" in stdout and "base" in json.loads((tmp_path / "b3" / "manifest.json").read_text())
    finally:
        shutil.move(tmp_path / "away.pt", pruned / "base.pt")


def test_data_without_a_test_split_exports_without_accuracy(tmp_path):
    """papm train accepts a tree with train/ only; its export measures no accuracy (no NaN in the manifest)."""
    root = write_pattern_folder(tmp_path / "data", per_class=8, size=16, parts=("train",))
    r = run_papm("train", "--dataset", "imagefolder", "--data-root", root, "--image-size", "16", "--width", str(TINY_WIDTH),
                 "--epochs", "1", "--out", "base.pt", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_papm("export", "base.pt", "--int8", "--calib-samples", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test accuracy not measured: the data has no test images" in r.stdout and "nan" not in r.stdout.lower()
    text = (tmp_path / "base-bundle" / "manifest.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))["accuracy"] == {"split": "test",
                                                                                                         "samples": 0}
    r = run_papm("bench", tmp_path / "base-bundle", "--runs", "2", "--warmup", "0", "--batch", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "nan" not in (tmp_path / "base-bundle" / "bench.md").read_text()
