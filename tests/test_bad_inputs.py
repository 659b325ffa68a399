"""Bad input a user can give: one line `error: <problem>; <fix>`, exit code 2, no traceback, nothing written."""

import json
import shutil

import pytest

from conftest import run_papm, write_imagefolder_for_cli
from test_export import exported_bundle


@pytest.fixture(scope="session")
def exported(tmp_path_factory, digits, base_ckpt):
    return exported_bundle(tmp_path_factory, digits, base_ckpt)


def one_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "digits", "--lr", "inf"], "finite number"),
    (["train", "--dataset", "digits", "--lr", "nan"], "finite number"),
    (["train", "--dataset", "digits", "--width", "0"], "--width must be in (0, 16]"),
    (["train", "--dataset", "digits", "--weight-decay", "-1"], "--weight-decay: expected a number >= 0 and below 1"),
    (["train", "--dataset", "digits", "--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
    (["train", "--dataset", "digits", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["train", "--dataset", "digits", "--label-smoothing", "2"], "--label-smoothing: expected a number >= 0 and below 1"),
    (["simulate", "--set", "int8=maybe"], "'int8' must be true or false (or yes/no, 1/0), got 'maybe'; e.g. int8=true"),
    (["simulate", "--set", "budget"], "--set expects key=value, got 'budget'; write --set budget=VALUE"),
    (["deploy", "init", "KIT", "--superlink", "coordinator.lan"], "HOST:PORT, got 'coordinator.lan'; e.g. --superlink coordinator.lan:8000"),
    (["train", "--dataset", "digits", "--image-size", "4"], "image size must be in [8, 512]"),
    (["simulate", "--set", "base-lr=inf"], "finite number"),
    (["simulate", "--set", "seed=-1"], "seed must be >= 0"),
    (["simulate", "--run-dir", ""], "run-dir is empty"),
    (["train", "--dataset", "digits", "--seed", "-1"], "--seed: must be >= 0"),
    (["train", "--dataset", "digits", "--epochs", "0"], "--epochs: must be >= 1"),
    (["bench", "no-bundle", "--warmup", "-1"], "--warmup: must be >= 0"),
    (["simulate", "--set", "width=1e9"], "width must be in (0, 16]"),
    (["simulate", "--set", "nodes=0"], "nodes must be >= 1, got 0; set a valid value (--set KEY=VALUE"),
    (["simulate", "--set", "nodes=200"], "cannot split 1295 samples across 200 nodes with at least 16 each; use fewer nodes"),
    (["simulate", "--config", "nope.toml"], "config file not found: nope.toml; check the path"),
    (["infer", "no-bundle", "x.png", "--bogus"], "papm infer: unrecognized arguments: --bogus; see `papm infer --help`"),
    (["export", "."], "is not a run directory (no base.pt or state.json)"),
    (["simulate", "--set", "image-size=1000"], "image-size must be in [8, 512]"),
    (["simulate", "--set", "dataset=imagefolder", "--set", "data-root=/nonexistent/photos"], "not a folder"),
    (["deploy", "init", "KIT", "--superlink", "h:99999"], "port must be 1-65535"),
    (["deploy", "init", "KIT", "--hosts", "bad host"], "not a host name"),
    (["deploy", "init", "KIT", "--hosts", "héllo.example"], "not a host name"),
    (["deploy", "init", "KIT", "--data-root-template", '/d/n{id}" --x=1'], "must not contain"),
])
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    args = [str(tmp_path / "kit") if a == "KIT" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_error(run_papm(*args, "--flwr-home", tmp_path / "fh") if args[0] == "deploy" else
                     run_papm(*args, cwd=tmp_path))
    assert needle in line, line
    assert "; " in line, line  # a problem and its fix
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "my.toml"
    bad.write_bytes(b"devices = 3\nname = \"\xff\xfe\"\n")
    assert "not UTF-8" in one_error(run_papm("simulate", "--config", bad, cwd=tmp_path))


def test_kit_folder_that_is_a_file(tmp_path):
    (tmp_path / "kit").write_text("not a folder")
    assert "is a file" in one_error(run_papm("deploy", "init", tmp_path / "kit", "--flwr-home", tmp_path / "fh"))


@pytest.mark.parametrize("field,value,needle", [
    ("parts", "not a list", "parts must be a non-empty list"),
    ("class_names", [1, 2], "class_names"),
    ("input", {"channels": "3", "image_size": 8}, "input.channels"),
    ("head", {"feature_size": 10, "input_name": "features", "files": {}}, "head.files"),
    # edited values (a callable edits the field as exported)
    ("class_names", lambda names: names[:2], "the head scores 10 classes but manifest.json names 2"),
    ("input", lambda i: {**i, "std": [0.0]}, "input.std finite and > 0"),
    ("input", lambda i: {**i, "mean": [float("nan")]}, "input.mean must be finite"),
    ("input", lambda i: {**i, "image_size": 0}, "input.image_size 8 to 512"),
])
def test_manifest_with_wrongly_typed_fields(tmp_path, field, value, needle, exported):
    bundle = tmp_path / "bundle"
    shutil.copytree(exported[1], bundle)
    (bundle / "manifest.sig").unlink(missing_ok=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest[field] = value(manifest[field]) if callable(value) else value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(png)
    assert needle in one_error(run_papm("infer", bundle, png))


def test_kit_folder_with_files_papm_did_not_write(tmp_path):
    """deploy init writes only into a new, empty or marked folder; --force changes nothing about that."""
    folder = tmp_path / "ukit"
    folder.mkdir()
    (folder / "COMMANDS.md").write_text("my notes")
    for force in ([], ["--force"]):
        line = one_error(run_papm("deploy", "init", folder, "--flwr-home", tmp_path / "fh", *force))
        assert "did not write" in line
    assert sorted(p.name for p in folder.iterdir()) == ["COMMANDS.md"] and (folder / "COMMANDS.md").read_text() == "my notes"
    assert not (tmp_path / "fh").exists()


def test_kit_is_marked_and_force_rewrites_it(tmp_path):
    kit = tmp_path / "kit"
    assert run_papm("deploy", "init", kit, "--flwr-home", tmp_path / "fh", "--insecure").returncode == 0
    assert json.loads((kit / ".papm-kit").read_text())["format"] == "papm-kit"
    assert "already holds a kit" in one_error(run_papm("deploy", "init", kit, "--flwr-home", tmp_path / "fh", "--insecure"))
    assert run_papm("deploy", "init", kit, "--flwr-home", tmp_path / "fh", "--insecure", "--force").returncode == 0


def _hand_made_run(tmp_path, config=None, state=None):
    from papm.server.run_directory import MARKER, MARKER_FORMAT, MARKER_VERSION
    from papm.shared.checkpoint import resolve_run_inputs
    from papm.shared.config import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": MARKER_VERSION}))
    cfg = resolve_run_inputs(RunConfig.from_overrides([f"run-dir={run}"])).to_flower()  # as a run writes it
    (run / "config.json").write_text(json.dumps(cfg if config is None else config))
    (run / "state.json").write_text(json.dumps({"completed": []} if state is None else state))
    return run


@pytest.mark.parametrize("config,state,needle", [
    (None, [], "state.json is damaged"),
    (None, {"completed": 5}, "state.json is damaged"),
    (None, {"completed": ["base", 3]}, "state.json is damaged"),
    ([1, 2], None, "holds a JSON list, not the run's settings"),
])
def test_hand_made_run_files(tmp_path, config, state, needle):
    run = _hand_made_run(tmp_path, config, state)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert needle in one_error(run_papm("simulate", "--run-dir", run, "--resume", cwd=tmp_path))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_checkpoint_with_wrongly_typed_metadata(tmp_path, base_ckpt):
    import torch

    ckpt = torch.load(base_ckpt, weights_only=True)
    ckpt["data"]["class_names"] = 5
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    line = one_error(run_papm("prune", bad, "--classes", "1", "--budget", "0.5", "--out", tmp_path / "p.pt", cwd=tmp_path))
    assert "damaged metadata" in line and "class_names" in line


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "digits", "--out", "FILE/base.pt"], "is a file, not a folder"),
    (["simulate", "--run-dir", "FILE/run"], "is a file, not a folder"),
    (["suite", "SUITE", "--runs-dir", "FILE"], "is a file"),
    (["export", "RUN", "--out", ""], "--out is empty"),
])
def test_paths_that_cannot_be_written_are_one_line_before_any_work(tmp_path, args, needle):
    (tmp_path / "afile.txt").write_text("mine")
    (tmp_path / "s.yaml").write_text("name: s\nbase: {}\ngrid: {devices: [2]}\n")
    args = [{"FILE": str(tmp_path / "afile.txt"), "SUITE": str(tmp_path / "s.yaml"), "RUN": str(tmp_path)}.get(a, a)
            .replace("FILE", str(tmp_path / "afile.txt")) for a in args]
    assert needle in one_error(run_papm(*args, cwd=tmp_path))
    assert (tmp_path / "afile.txt").read_text() == "mine"


def test_a_second_bench_needs_force(tmp_path, exported):
    bundle = exported[1]
    args = ("bench", bundle, "--runs", "1", "--warmup", "0", "--batch", "2", "--out", tmp_path)
    assert run_papm(*args).returncode == 0
    first = (tmp_path / "bench.csv").read_bytes()
    assert "already exists" in one_error(run_papm(*args))
    assert (tmp_path / "bench.csv").read_bytes() == first
    assert run_papm(*args, "--force").returncode == 0


def test_infer_errors_are_the_only_line_without_a_verify_key(tmp_path, exported):
    """The unsigned-bundle warning follows the work: a failed command prints its error line alone."""
    garbage = tmp_path / "x.png"
    garbage.write_bytes(b"not an image")
    assert "x.png" in one_error(run_papm("infer", exported[1], garbage))
    features_dir = tmp_path / "f"
    features_dir.mkdir()
    assert "is a folder" in one_error(run_papm("infer", exported[1], "--part", "0", garbage, "--out", features_dir, "--force"))


def test_a_junk_signing_key_is_refused_at_once(tmp_path):
    from papm.deploy.bundle import check_signing_key
    from papm.shared.errors import PapmError

    junk = tmp_path / "key.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PapmError, match="not an unencrypted signing"):
        check_signing_key(junk)


def test_training_that_diverges_saves_nothing(tmp_path):
    out = tmp_path / "base.pt"
    line = one_error(run_papm("train", "--dataset", "digits", "--width", "0.125", "--epochs", "1", "--lr", "1e30",
                              "--out", out, "--quiet", cwd=tmp_path))
    assert "training diverged" in line and not out.exists() and not (tmp_path / "base.pt.partial").exists()


def test_a_run_with_a_junk_signing_key_stops_before_writing_anything(tmp_path):
    junk = tmp_path / "key.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    line = one_error(run_papm("simulate", "--set", f"sign-key={junk}", "--run-dir", tmp_path / "run", cwd=tmp_path))
    assert "not an unencrypted signing" in line and not (tmp_path / "run").exists()


def test_an_imagefolder_tree_read_as_cifar10_says_which_dataset_it_is(tmp_path, digits):
    """A common mix-up: CIFAR-10 unpacked into JPEG folders, then run as dataset=cifar10 (torchvision's files)."""
    root = tmp_path / "photos"
    write_imagefolder_for_cli(root, digits)
    line = one_error(run_papm("simulate", "--set", "dataset=cifar10", "--set", f"data-root={root}",
                              "--run-dir", tmp_path / "run", cwd=tmp_path))
    assert "holds an ImageFolder tree" in line and "dataset=imagefolder" in line, line
    assert not (tmp_path / "run").exists()


def test_a_budget_no_channel_cut_reaches_is_refused_before_any_work(tmp_path):
    """budget=0.9999 of a width-0.125 ResNet-18 cannot be met (every layer kept at one channel still leaves more): the
    run says so at its start, with the largest budget that can, not in its prune phase after the statistics; the
    folder it started is not held, so the corrected command starts afresh."""
    from papm.server.run_directory import RunDirectory
    from papm.shared.config import RunConfig
    from papm.shared.errors import PapmError
    from papm.shared.pruning import largest_reduction
    from papm.shared.models import model_args
    from papm.simulations.direct import run_direct

    cfg = RunConfig.from_overrides([f"run-dir={tmp_path / 'run'}", "width=0.125", "budget=0.9999", "device=cpu"])
    with pytest.raises(PapmError) as e:
        run_direct(cfg)
    msg = str(e.value)
    largest = float(msg.split("set budget <= ")[1])
    assert msg.startswith("budget=0.9999 cannot be met:") and "\n" not in msg
    assert largest <= largest_reduction(model_args(10, 1, 0.125), 8) < largest + 0.001  # the digits' 10 classes, 1x8x8
    assert not (tmp_path / "run" / "base.pt").exists() and RunDirectory(tmp_path / "run").discard_failed_start()
    # a budget that a cut reaches, and round-to making the largest one smaller
    with pytest.raises(PapmError, match=r"budget=0.99 cannot be met: .* or a smaller round-to"):
        run_direct(RunConfig.from_overrides([f"run-dir={tmp_path / 'run2'}", "width=0.125", "budget=0.99",
                                             "round-to=8", "device=cpu"]))
