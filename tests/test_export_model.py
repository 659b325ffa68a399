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

from conftest import run_papm

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
    return pruned / "p-bundle"


def pngs(folder, digits, n=12):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray(digits.test.x[i, 0].numpy(), mode="L").save(folder / f"img{i:02d}.png")
    return folder


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


def test_base_option_adds_a_base(pruned, tmp_path):
    shutil.copy(pruned / "p.pt", tmp_path / "p.pt")  # the recorded base.pt is not beside this copy
    shutil.copy(pruned / "base.pt", tmp_path / "moved-base.pt")
    r = run_papm("export", tmp_path / "p.pt", "--out", tmp_path / "no-base", cwd=tmp_path / "..")
    assert r.returncode == 0, r.stderr
    assert "base" not in json.loads((tmp_path / "no-base" / "manifest.json").read_text())
    r = run_papm("export", "p.pt", "--base", "moved-base.pt", "--out", "with-base", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "with-base" / "manifest.json").read_text())["source"]["base_checkpoint"] == "moved-base.pt"


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
        (["p.pt", "--base", "missing.pt", "--out", str(tmp_path / "x")], "--base missing.pt not found"),
        (["p.pt", "--out", str(tmp_path / "notes")], "is not a PAPM edge bundle"),
        (["p.pt", "--out", str(bundle)], "already exists; pass --force"),
        (["p.pt", "--out", "."], "is inside --out"),
        ([str(pruned), "--base", "base.pt"], "--base goes with a checkpoint"),
        (["pruned-typo.pt"], "run directory or checkpoint not found: pruned-typo.pt"),
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
